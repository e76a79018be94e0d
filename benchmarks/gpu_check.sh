#!/usr/bin/env bash
# The device checks, run in one go on a lent GPU machine (see benchmarks/RESULTS.md for the figures).
# Needs: .whl/ (polars, polars-runtime-32, python-dotenv wheels) and .gpudata/train.parquet carried along.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
DATA=${DATA:-.gpudata/train.parquet}
# model-only vs `twotower train`, and `--tokenize on-demand` (what each torchrun process does), batch 1024
timeout 300 python3 benchmarks/train_throughput.py --data "$DATA" --device cuda --batch-size 1024 --steps 150 --epochs 3 2>&1 | tee "$OUT/train_ngram.txt"
# the whole command on the GPU: the defaults but the device and batch
( time timeout 200 python3 -m twotower_cli train "$DATA" --device cuda --batch-size 1024 --runs-dir /tmp/gpuruns --no-report ) 2>&1 | tail -25 | tee "$OUT/train_full.txt"
