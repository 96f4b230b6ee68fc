#!/usr/bin/env bash
# examples/sentiment/run.sh [WORKDIR]: the DPO paper's controlled-sentiment experiment on this machine.
#
# Runs alignmentrun.yaml with `kubealign run --local` (62 stages: 5 seeds, 4 values of beta for DPO
# and PPO; live progress, then a table of every stage's metrics), then plot.py: the frontier table
# (reward, exact KL and win rate with 95% intervals over seeds and prompts), the DPO-PPO comparison
# and the plot. WORKDIR defaults to runs/sentiment in the checkout; a rerun skips the stages that
# already finished. Exit status 1 if the method checks fail (plot.py --check); the comparison's
# outcome is reported, not checked.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
workdir="${1:-$repo/runs/sentiment}"
# The checkout's virtual environment (README, command 1), unless $PYTHON names another interpreter.
python="${PYTHON:-$repo/.venv/bin/python}"

"$python" -m kubealign.cli run "$here/alignmentrun.yaml" --local --workdir "$workdir"
echo
"$python" "$here/plot.py" --workdir "$workdir" --check
