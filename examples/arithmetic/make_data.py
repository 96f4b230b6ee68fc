"""Generate the arithmetic example's data: sums and differences of two-digit numbers.

    data/corpus.txt        pretraining text: one worked problem per line, "27+45=72"
    data/sft.jsonl         {"prompt": "27+45=", "completion": "72"} on the training problems
    data/prompts.jsonl     {"prompt", "answer"} for GRPO: the training problems again, answers only
    data/eval.jsonl        {"prompt", "answer"}: held-out problems no stage trains on

Problems are ``a+b`` and ``a-b`` for a, b in 0..99 with a >= b for differences; a fixed seed
splits them into training and held-out problems. ``--check`` verifies the committed files.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

SEED = 7
HELD_OUT = 300
SFT_ROWS = 1200
GRPO_PROMPTS = 1200
DATA_DIR = Path(__file__).resolve().parent / "data"


def problems() -> list[tuple[str, str]]:
    """Every (question, answer), in a fixed order."""
    out = []
    for a in range(100):
        for b in range(100):
            out.append((f"{a}+{b}=", str(a + b)))
            if a >= b:
                out.append((f"{a}-{b}=", str(a - b)))
    return out


def build() -> dict[str, str]:
    rng = random.Random(SEED)
    every = problems()
    rng.shuffle(every)
    held_out, train = every[:HELD_OUT], every[HELD_OUT:]

    def jsonl(rows: Sequence[dict[str, str]]) -> str:
        return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)

    return {
        "corpus.txt": "".join(f"{q}{a}\n" for q, a in train),
        "sft.jsonl": jsonl([{"prompt": q, "completion": a} for q, a in train[:SFT_ROWS]]),
        "prompts.jsonl": jsonl([{"prompt": q, "answer": a} for q, a in train[:GRPO_PROMPTS]]),
        "eval.jsonl": jsonl([{"prompt": q, "answer": a} for q, a in held_out]),
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
            print(f"{args.out}: out of date: {', '.join(stale)}; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text)
        print(f"{args.out / name}: {len(text.encode())} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
