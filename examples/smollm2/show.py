"""The smollm2 example's results: DPO's held-out reward accuracy and margin, and answers before and after.

    python examples/smollm2/show.py [--workdir runs/smollm2]

Reads ``<workdir>/status.json`` (the local runner's copy of the resource's status) for the dpo
stage's final metrics, and the evaluate stage's ``results.json`` for the answers the SFT model
(before DPO) and the DPO model (after) gave to held-out questions at temperature 1.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
# ChatML, as SmolLM2's template renders it: the last user turn is the question.
USER_TURN = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.DOTALL)


def stages(workdir: Path) -> dict[str, dict[str, Any]]:
    status_path = workdir / "status.json"
    try:
        status = json.loads(status_path.read_text())
    except OSError as exc:
        raise SystemExit(
            f"{status_path}: {exc.strerror}; run the example first (examples/smollm2/run.sh)"
        ) from exc
    found = {stage["name"]: stage for stage in status.get("stages", [])}
    for name in ("dpo", "evaluate"):
        if found.get(name, {}).get("phase") != "Succeeded":
            raise SystemExit(
                f"{status_path}: stage {name} is {found.get(name, {}).get('phase')}, not Succeeded"
            )
    return found


def question(prompt: str) -> str:
    turns = USER_TURN.findall(prompt)
    return turns[-1].strip() if turns else prompt.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", type=Path, default=Path(__file__).resolve().parents[2] / "runs" / "smollm2"
    )
    args = parser.parse_args(argv)
    found = stages(args.workdir)
    from kubealign_jobs import storage

    metrics = found["dpo"].get("metrics") or {}
    print("DPO on held-out questions (implicit reward beta * log pi/pi_ref, 0 for every answer before DPO):")
    for key in ("eval_reward_accuracy", "eval_reward_margin", "eval_chosen_reward", "eval_rejected_reward"):
        if key in metrics:
            print(f"  {key:<24} {float(metrics[key]):8.4f}")
    report = storage.read_json(storage.join(str(found["evaluate"]["output"]), RESULTS_FILE))
    temperature = max(report["policies"]["reference"], key=float)
    cells = {name: report["policies"][name][temperature] for name in report["policies"]}
    print(f"\nAnswers at temperature {temperature} (judge: {report['judge']}; KL and win rate against SFT):")
    for name, cell in cells.items():
        label = "sft" if name == "reference" else name
        figures = f"reward {cell['reward']:+.3f}  KL {cell['kl']:6.2f}  win rate {cell['win_rate']:.3f}"
        print(f"  {label:<6} {figures}  n {cell['n']:.0f}")
    judged = cells.get("dpo", {})
    if "judge_n" in judged:
        print(
            f"\nDPO against SFT, judged pairwise by {report['pairwise_judge']['judge']} "
            f"({report['pairwise_judge']['orders']}):"
        )
        counts = (
            f"{judged['judge_wins']:.0f} wins, {judged['judge_ties']:.0f} ties, "
            f"{judged['judge_losses']:.0f} losses, {judged['judge_unparseable']:.0f} unparseable"
        )
        if "judge_win_rate" in judged:
            print(
                f"  win rate {judged['judge_win_rate']:.3f} "
                f"[{judged['judge_win_rate_low']:.3f}, {judged['judge_win_rate_high']:.3f}] (95%), "
                f"length-controlled {judged.get('judge_lc_win_rate', float('nan')):.3f}; {counts}"
            )
        else:
            print(f"  no verdict could be parsed: {counts}")
    before = report["answers"]["reference"][temperature]
    after = report["answers"]["dpo"][temperature]
    print("\nBefore (SFT) and after (DPO): the first answer to each held-out question")
    firsts = {}  # the same prompts in the same order for both policies: one answer per question
    for old, new in zip(before, after, strict=False):
        firsts.setdefault(old["prompt"], (old, new))
    for old, new in firsts.values():
        print(f"  Q: {question(old['prompt'])}")
        print(f"     sft: {old['answer'].strip()!r}")
        print(f"     dpo: {new['answer'].strip()!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
