#!/usr/bin/env bash
# The reference engines for bench/compare.sh, from PyPI, in a virtual environment of their
# own (.tools/bench-venv; about 6 GB, as PyPI's torch wheel brings CUDA libraries):
# PyTorch + sentence-transformers, ONNX Runtime + the exporter. Prints the python to use.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.tools/bench-venv
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  torch==2.15.0 sentence-transformers==6.2.0 transformers==5.24.0 \
  onnxruntime==1.32.0 onnx==1.23.2 onnxscript==0.7.2 numpy==2.4.6 >&2
echo "$VENV/bin/python"
