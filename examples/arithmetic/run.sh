#!/usr/bin/env bash
# examples/arithmetic/run.sh [WORKDIR]: GRPO with a verifiable reward on two-digit arithmetic.
#
# Runs alignmentrun.yaml with `kubealign run --local` (pretrain -> sft -> grpo over 5 seeds), then
# report.py: the held-out accuracy of SFT and of each GRPO seed, and the gain with a 95% interval.
# WORKDIR defaults to runs/arithmetic in the checkout; a rerun skips the stages that already finished.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
workdir="${1:-$repo/runs/arithmetic}"
# The checkout's virtual environment (README, command 1), unless $PYTHON names another interpreter.
python="${PYTHON:-$repo/.venv/bin/python}"

"$python" -m kubealign.cli run "$here/alignmentrun.yaml" --local --workdir "$workdir"
echo
"$python" "$here/report.py" --workdir "$workdir" --check
