#!/usr/bin/env bash
# The device checks, run in one go on a lent GPU machine (about 6 minutes; figures go to benchmarks/RESULTS.md).
# Needs, carried along: .whl/ (polars, polars-runtime-32, python-dotenv, bm25s, typer, annotated-doc wheels) and
# .gpudata/train.parquet (the Debian pairs). DEVICE=cpu runs the same steps here, small, to check the script.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
DATA=${DATA:-.gpudata/train.parquet}
STEPS=${STEPS:-120}
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU") | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

# 1. model-only vs a plain trigram bag vs `twotower train` vs on-demand (worker processes), batch 1024 and 4096
for B in 1024 4096; do
  timeout 240 $PY benchmarks/train_throughput.py --data "$DATA" --device $DEVICE --batch-size $B --steps $STEPS \
    --epochs 2 --max-steps $((STEPS * 2)) 2>&1 | tail -8 | tee -a "$OUT/throughput.txt"
done

# 2. torchrun with NCCL (1 process: the code path the sparse table takes under several GPUs)
( time timeout 180 $PY -m torch.distributed.run --nproc_per_node 1 -m twotower_cli train "$DATA" --device $DEVICE \
    --batch-size 1024 --max-steps 200 --no-report --runs-dir /tmp/ddp ) 2>&1 | tail -14 | tee "$OUT/torchrun.txt"

# 3. the whole command with the defaults but the device and batch: wall time and validation
( time timeout 300 $PY -m twotower_cli train "$DATA" --device $DEVICE --batch-size 1024 --no-report \
    --runs-dir /tmp/full ) 2>&1 | tail -30 | tee "$OUT/train_full.txt"

# 4. index 1M documents on the GPU vs the host CPU (a 100k slice there), and evaluate on the GPU
$PY - <<'EOF'
import polars as pl, os
docs = pl.read_parquet(os.environ.get("DATA", ".gpudata/train.parquet"))["document"].unique()
n = int(os.environ.get("NDOCS", "1000000"))
reps = n // len(docs) + 1
big = pl.concat([docs + f" ~{k}" for k in range(reps)]).head(n)
pl.DataFrame({"document": big}).write_parquet("/tmp/big.parquet")
pl.DataFrame({"document": big.head(n // 10)}).write_parquet("/tmp/small.parquet")
print("corpus", len(big))
EOF
( time timeout 240 $PY -m twotower_cli index /tmp/big.parquet --name big --device $DEVICE --runs-dir /tmp/full ) 2>&1 \
  | tail -5 | tee "$OUT/index.txt"
( time timeout 200 $PY -m twotower_cli index /tmp/small.parquet --name small --device cpu --runs-dir /tmp/full ) 2>&1 \
  | tail -5 | tee -a "$OUT/index.txt"
# the same 1M documents under torchrun with every GPU of the machine (sharded when there are 2 or more)
NPROC=${NPROC:-$($PY -c "import torch; print(max(torch.cuda.device_count(), 1))")}
( time timeout 240 $PY -m torch.distributed.run --nproc_per_node $NPROC -m twotower_cli index /tmp/big.parquet \
    --name bigshard --device $DEVICE --runs-dir /tmp/full ) 2>&1 | tail -5 | tee -a "$OUT/index.txt"
( time timeout 120 $PY -m twotower_cli search "GNU C compiler" --index big --device $DEVICE --runs-dir /tmp/full \
    --json -k 3 ) 2>&1 | tail -12 | tee "$OUT/search.txt"
