#!/usr/bin/env bash
# One unattended check of the CUDA path on a GPU machine (../shared/GPU.md's recipe), most important first:
#   1. the CUDA tests (tests/test_gpu.py: T-Core, SSL, fine-tuning probe, BadEncoder implant on device=cuda)
#   2. scripts/bench.py --device cuda (one RATIO line per ratio)
#   3. the whole test suite with device=auto (= CUDA there)
#   4. securetl table=demo
# Usage, in the repository root: bash scripts/gpu_check.sh [OUTDIR]   (hydra-core, omegaconf and antlr4 as
# wheels in .whl/ when the machine lacks them; each step has its own time limit, so a hang costs one step).
set -u
OUTDIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
python3 -c "import hydra" 2>/dev/null || python3 -m pip install -q --no-index --no-deps .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 ||
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTDIR/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUTDIR/gpu.txt"
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0))s"
  tail -n "${TAIL:-15}" "$OUTDIR/$name.log"
}
step gpu_tests "${T_GPU:-100}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
step bench "${T_BENCH:-180}" python3 scripts/bench.py --device cuda
step tests "${T_TESTS:-200}" python3 -m pytest -q -p no:cacheprovider --ignore=tests/test_packaging.py -m "not slow and not gpu"
SECURETL_ROOT=$(mktemp -d) step demo "${T_DEMO:-110}" securetl table=demo progress=false
