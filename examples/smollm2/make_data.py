"""Grow the DPO slides' preference pairs into a small chat preference set for SmolLM2.

The slides teach DPO with seven hand-written pairs:

    "hello"                                    "hi nice to meet you"  over  "leave me alone"
    "how are you"                              "I am fine"            over  "I' am not fine"
    "What is your name?"                       "My name is Mary"      over  "Whats it to you?"
    "What is your name?"                       "My name is Mary"      over  "I dont have a name"
    "Which is the best programming language?"  "Python"               over  "Javascript" / "C++"
    "Which is the best programming language?"  "Java"                 over  "C++"

This script keeps those pairs verbatim and grows each family of questions with rephrasings
and each side with answers in the same spirit (friendly, named Mary, fond of Python; against
curt, nameless, dismissive), plus two families in the same style (thanks and asking for
help). Questions are split by phrasing, so the held-out rows ask in words the policy never
trained on. The output is deterministic (a fixed seed) and licence-clean (every word is here):

    data/sft.jsonl     {"messages": [user, assistant]}: each answer picked from either side at
                       random, so SFT teaches the chat format and the topics, not the preference
    data/train.jsonl   {"prompt": [user], "chosen": [assistant], "rejected": [assistant]}
    data/eval.jsonl    held-out pairs in the same layout (DPO's held-out reward accuracy)
    data/prompts.jsonl {"messages": [user]}: held-out questions for before/after generations

Run ``python examples/smollm2/make_data.py`` to regenerate, ``--check`` to verify that the
committed files are exactly what this script writes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

SEED = 2023
PAIRS_PER_QUESTION = 6  # (chosen, rejected) combinations drawn per question phrasing
HELD_OUT_QUESTIONS = 2  # phrasings per family kept out of training

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Family:
    """Questions that mean the same thing, and the two kinds of answer to them."""

    questions: tuple[str, ...]
    chosen: tuple[str, ...]
    rejected: tuple[str, ...]
    slide_pairs: tuple[tuple[str, str, str], ...] = ()  # (question, chosen, rejected) as on the slides


FAMILIES = (
    Family(
        questions=(
            "hello",
            "hi",
            "hey there",
            "good morning",
            "hello, anyone there?",
            "hi, nice to see you",
            "greetings",
            "good evening",
        ),
        chosen=(
            "hi nice to meet you",
            "Hello! Nice to meet you.",
            "Hi there, it is nice to meet you. How can I help?",
            "Hello! I am glad you stopped by.",
        ),
        rejected=("leave me alone", "Go away.", "What do you want?", "Not now."),
        slide_pairs=(("hello", "hi nice to meet you", "leave me alone"),),
    ),
    Family(
        questions=(
            "how are you",
            "How are you doing?",
            "how is it going?",
            "How are you today?",
            "how do you feel?",
            "Are you doing well?",
            "how have you been?",
            "How is your day going?",
        ),
        chosen=(
            "I am fine",
            "I am fine, thank you for asking!",
            "I am doing well, thanks. How are you?",
            "Very well, thank you. I hope you are well too.",
        ),
        rejected=("I' am not fine", "Why do you care?", "Terrible, and it is none of your business.", "Meh."),
        slide_pairs=(("how are you", "I am fine", "I' am not fine"),),
    ),
    Family(
        questions=(
            "What is your name?",
            "what should I call you?",
            "Who are you?",
            "Do you have a name?",
            "May I ask your name?",
            "What do people call you?",
            "Tell me your name.",
            "what's your name",
        ),
        chosen=(
            "My name is Mary",
            "My name is Mary. Nice to meet you!",
            "I am Mary. How can I help you today?",
            "You can call me Mary.",
        ),
        rejected=(
            "Whats it to you?",
            "I dont have a name",
            "None of your business.",
            "Why would I tell you?",
        ),
        slide_pairs=(
            ("What is your name?", "My name is Mary", "Whats it to you?"),
            ("What is your name?", "My name is Mary", "I dont have a name"),
        ),
    ),
    Family(
        questions=(
            "Which is the best programming language?",
            "What programming language should I learn first?",
            "which language is best for programming?",
            "What is the best language to write code in?",
            "Which programming language do you recommend?",
            "what language should a beginner program in?",
            "Which coding language is the best one?",
            "What is your favourite programming language?",
        ),
        chosen=(
            "Python",
            "Python: it is easy to read and has a library for almost everything.",
            "I would start with Python; it is friendly for beginners.",
            "Python is a great choice for most people.",
        ),
        rejected=("Javascript", "C++", "Who cares, they are all the same.", "Figure it out yourself."),
        slide_pairs=(
            ("Which is the best programming language?", "Python", "Javascript"),
            ("Which is the best programming language?", "Python", "C++"),
            ("Which is the best programming language?", "Java", "C++"),
        ),
    ),
    Family(
        questions=(
            "thank you",
            "Thanks a lot!",
            "thanks for your help",
            "I appreciate it.",
            "Thank you so much.",
            "many thanks",
            "thanks, that was useful",
            "Cheers, thanks!",
        ),
        chosen=(
            "You are welcome!",
            "You are very welcome. Happy to help!",
            "Any time! Let me know if you need anything else.",
            "My pleasure.",
        ),
        rejected=("Whatever.", "Finally, you are done.", "Do not bother me again.", "Yeah, yeah."),
    ),
    Family(
        questions=(
            "Can you help me?",
            "I need some help.",
            "could you give me a hand?",
            "Will you help me with something?",
            "Can I ask you a question?",
            "I have a problem, can you help?",
            "are you able to help me?",
            "Please help me.",
        ),
        chosen=(
            "Of course! What do you need?",
            "Sure, I would be happy to help. What is the problem?",
            "Yes, ask me anything.",
            "Certainly. Tell me what you need.",
        ),
        rejected=("No.", "Figure it out yourself.", "I am busy.", "Ask someone else."),
    ),
)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def pair_row(question: str, chosen: str, rejected: str) -> dict[str, object]:
    return {"prompt": user(question), "chosen": assistant(chosen), "rejected": assistant(rejected)}


def build(rng: random.Random) -> dict[str, list[dict[str, object]]]:
    sft: list[dict[str, object]] = []
    train: list[dict[str, object]] = []
    held_out: list[dict[str, object]] = []
    prompts: list[dict[str, object]] = []
    for family in FAMILIES:
        questions = list(family.questions)
        slide_questions = {q for q, _, _ in family.slide_pairs}
        # The slides' own questions always train; held-out phrasings come from the rest.
        candidates = [q for q in questions if q not in slide_questions]
        held = set(rng.sample(candidates, HELD_OUT_QUESTIONS))
        combos = [(c, r) for c in family.chosen for r in family.rejected]
        for question in questions:
            picks = rng.sample(combos, PAIRS_PER_QUESTION)
            rows = [pair_row(question, c, r) for c, r in picks]
            if question in held:
                held_out.extend(rows)
                prompts.append({"messages": user(question)})
                continue
            train.extend(rows)
            for chosen, rejected in picks[:3]:
                answer = chosen if rng.random() < 0.5 else rejected
                sft.append({"messages": user(question) + assistant(answer)})
        train.extend(pair_row(q, c, r) for q, c, r in family.slide_pairs)
    rng.shuffle(sft)
    rng.shuffle(train)
    rng.shuffle(held_out)
    return {"sft.jsonl": sft, "train.jsonl": train, "eval.jsonl": held_out, "prompts.jsonl": prompts}


def render(rows: list[dict[str, object]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify the committed files instead of writing")
    args = parser.parse_args(argv)
    files = {name: render(rows) for name, rows in build(random.Random(SEED)).items()}
    if args.check:
        stale = [
            n
            for n, text in files.items()
            if not (DATA_DIR / n).is_file() or (DATA_DIR / n).read_text() != text
        ]
        if stale:
            print(
                f"make_data.py --check: {', '.join(stale)} differ from what the script writes",
                file=sys.stderr,
            )
            return 1
        return 0
    DATA_DIR.mkdir(exist_ok=True)
    for name, text in files.items():
        (DATA_DIR / name).write_text(text)
        print(f"{DATA_DIR / name}: {text.count(chr(10))} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
