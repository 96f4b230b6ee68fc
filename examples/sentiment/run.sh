#!/usr/bin/env bash
# examples/sentiment/run.sh [WORKDIR]: the DPO paper's controlled-sentiment experiment on this machine.
#
# Runs alignmentrun.yaml with `kubealign run --local` (live progress, then a table of every stage's
# metrics), then plot.py: the results table (reward, KL and win rate of SFT, DPO, PPO and Best-of-N)
# and the reward-KL frontier plot. WORKDIR defaults to runs/sentiment in the checkout; a rerun
# skips the stages that already finished. Exit status 1 if DPO or PPO does not beat SFT.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
workdir="${1:-$repo/runs/sentiment}"
# The checkout's virtual environment (README, command 1), unless $PYTHON names another interpreter.
python="${PYTHON:-$repo/.venv/bin/python}"

"$python" -m kubealign.cli run "$here/alignmentrun.yaml" --local --workdir "$workdir"
echo
"$python" "$here/plot.py" --workdir "$workdir" --check
