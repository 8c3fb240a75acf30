#!/usr/bin/env bash
# Quick start: install into .venv, distil the offline demo recipe on the CPU, export the student.
# Nothing is downloaded but packages: the upstreams are random-init from configs and the corpus
# ships in data/demo. About 2 minutes on a 2-core CPU once installed.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
# An existing torch (e.g. your CUDA build) is kept; otherwise take the pinned one first, since
# an unpinned resolve can pull a multi-GB CUDA build on a CPU-only machine.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
rm -rf runs/demo
fusion-distill train recipes/demo.yaml --output-dir runs/demo
fusion-distill export runs/demo runs/demo/exported
cat <<MSG

The student is a stock Hugging Face model in runs/demo/exported. Load it with no custom code:
  from transformers import AutoModel
  model = AutoModel.from_pretrained("runs/demo/exported")
MSG
