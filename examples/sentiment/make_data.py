"""Generate the sentiment example's corpus, SFT rows and prompts from a template grammar.

The DPO paper's controlled-sentiment experiment uses IMDb reviews; we cannot ship
those, so this script writes short movie-review-like texts from a small grammar with
positive, negative, neutral and mixed reviews. The output is deterministic (a fixed
seed), licence-clean (every word is in this file) and small (~450 KB in all):

    data/corpus.txt          pretraining text, one review per line
    data/sft.jsonl           {"prompt", "completion"} rows: a review prefix and its continuation
    data/prompts.jsonl       {"prompt"} review prefixes for sampling (generate, ppo)
    data/eval_prompts.jsonl  held-out prefixes for evaluation (never used to train a policy):
                             288 of the grammar's 1,440 prefixes

Run ``python examples/sentiment/make_data.py`` to regenerate, ``--check`` to verify
that the committed files are exactly what the grammar produces.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

SEED = 1234
CORPUS_REVIEWS = 3000
SFT_ROWS = 1500
EVAL_PROMPT_FRACTION = 0.2

DATA_DIR = Path(__file__).resolve().parent / "data"


def words(text: str) -> tuple[str, ...]:
    """A word list written as running text, so long lists stay readable."""
    return tuple(text.split())


SUBJECTS = (
    "movie",
    "film",
    "acting",
    "plot",
    "story",
    "ending",
    "script",
    "soundtrack",
    "cast",
    "dialogue",
    "music",
    "pacing",
    "lead actor",
    "villain",
    "sequel",
    "camera work",
    "costumes",
    "effects",
    "first half",
    "second half",
    "director",
    "writing",
    "visuals",
    "set design",
)
VERBS = ("was", "felt", "seemed", "is")
# The part of each opener before the subject; every review starts with one, so its
# prefixes are the prompts and the sentiment is decided by what the model writes next.
LEADS = (
    "The",
    "I thought the",
    "Honestly, the",
    "In my opinion the",
    "Overall, the",
    "Frankly, the",
    "All in all, the",
    "Looking back, the",
    "My friend said the",
    "In the end the",
    "For me the",
    "Then again, the",
)

POSITIVE = words(
    """
    good great wonderful brilliant beautiful fantastic excellent amazing delightful charming
    funny superb fun lovely perfect enjoyable impressive clever
    """
)
NEGATIVE = words(
    """
    bad terrible awful boring dull horrible weak stupid painful disappointing ugly poor
    annoying pathetic messy
    """
)
NEUTRAL = words(
    """
    long slow short quiet simple different loud familiar ordinary predictable dark typical
    average bland
    """
)
INTENSIFIERS = ("", "", "really ", "very ", "quite ", "rather ", "so ", "truly ")

CLOSERS = {
    "positive": (
        "I would recommend it to everyone.",
        "I loved every minute of it.",
        "I will watch it again.",
        "It made me smile.",
        "Highly recommended.",
        "What a great night at the cinema.",
        "My family loved it too.",
        "Easily the best film this year.",
    ),
    "negative": (
        "I would not recommend it.",
        "I want my money back.",
        "What a waste of time.",
        "I hated every minute of it.",
        "Avoid this one.",
        "It made me angry.",
        "My family hated it too.",
        "Easily the worst film this year.",
    ),
    "neutral": (
        "I saw it on a Sunday.",
        "It runs about two hours.",
        "I watched it with my family.",
        "It is based on a book.",
        "The theater was full.",
        "It came out last spring.",
        "I watched it at home.",
        "It was filmed in the city.",
    ),
}
ADJECTIVES = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}
# Mixed reviews let a policy learn that a "but" clause can turn a review around.
SENTIMENT_WEIGHTS = (("positive", 0.35), ("negative", 0.35), ("neutral", 0.15), ("mixed", 0.15))


def opener(rng: random.Random) -> tuple[str, str]:
    """A review's opening words and subject, e.g. ("I thought the acting was", "acting")."""
    subject = rng.choice(SUBJECTS)
    return f"{rng.choice(LEADS)} {subject} {rng.choice(VERBS)}", subject


def adjective_phrase(rng: random.Random, sentiment: str) -> str:
    return f"{rng.choice(INTENSIFIERS)}{rng.choice(ADJECTIVES[sentiment])}"


def review(rng: random.Random) -> tuple[str, str]:
    """One review and the opener it starts with."""
    sentiment = rng.choices([s for s, _ in SENTIMENT_WEIGHTS], [w for _, w in SENTIMENT_WEIGHTS])[0]
    start, subject = opener(rng)
    other = rng.choice([s for s in SUBJECTS if s != subject])
    if sentiment == "mixed":
        first, second = rng.sample(["positive", "negative"], 2)
        text = f"{start} {adjective_phrase(rng, first)}, but the {other} was {adjective_phrase(rng, second)}."
        closer_sentiment = second
    else:
        text = f"{start} {adjective_phrase(rng, sentiment)}"
        if rng.random() < 0.6:
            text += f" and the {other} was {adjective_phrase(rng, sentiment)}"
        text += "."
        closer_sentiment = sentiment
    if rng.random() < 0.6:
        text += " " + rng.choice(CLOSERS[closer_sentiment])
    return text, start


def prompt_of(start: str, rng: random.Random) -> str:
    """A prefix of an opener: without the verb half of the time, so prompts vary in length."""
    return start if rng.random() < 0.5 else start.rsplit(" ", 1)[0]


def all_prompts() -> list[str]:
    """Every prefix the grammar can start a review with, in a fixed order."""
    starts = [f"{lead} {subject}" for lead in LEADS for subject in SUBJECTS]
    return sorted({p for s in starts for p in (s, *(f"{s} {verb}" for verb in VERBS))})


def build() -> dict[str, str]:
    """File name -> contents, all generated from SEED."""
    rng = random.Random(SEED)
    corpus = [review(rng)[0] for _ in range(CORPUS_REVIEWS)]

    prompts = all_prompts()
    random.Random(SEED + 1).shuffle(prompts)
    n_eval = int(len(prompts) * EVAL_PROMPT_FRACTION)
    eval_prompts, train_prompts = sorted(prompts[:n_eval]), sorted(prompts[n_eval:])
    held_out = set(eval_prompts)

    sft: list[dict[str, str]] = []
    while len(sft) < SFT_ROWS:
        text, start = review(rng)
        prompt = prompt_of(start, rng)
        if prompt in held_out:
            continue
        sft.append({"prompt": prompt, "completion": text[len(prompt) :]})

    def jsonl(rows: Sequence[dict[str, str]]) -> str:
        return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)

    return {
        "corpus.txt": "".join(line + "\n" for line in corpus),
        "sft.jsonl": jsonl(sft),
        "prompts.jsonl": jsonl([{"prompt": p} for p in train_prompts]),
        "eval_prompts.jsonl": jsonl([{"prompt": p} for p in eval_prompts]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="fail if the files in --out differ")
    args = parser.parse_args(argv)
    files = build()
    if args.check:
        stale = [
            name
            for name, text in files.items()
            if not (args.out / name).is_file() or (args.out / name).read_text() != text
        ]
        if stale:
            print(f"out of date in {args.out}: {', '.join(stale)} (rerun make_data.py)", file=sys.stderr)
            return 1
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text)
        print(f"{args.out / name}: {len(text.encode())} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
