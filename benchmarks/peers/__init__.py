"""One small module per tool in the side-by-side sweep benchmark (see ``benchmarks/README.md``).

Each module exposes ``run(b: Bench, config: str, cells: list[Cell]) -> dict`` returning the
patched-metric matrix (NaN outside ``cells``), the time of the sweep loop only (``sweep_s``, after
set-up and the clean/corrupt baseline forwards, which double as warm-up) and ``setup_s``.
"""

#: tool name -> module name in this package
TOOLS = {
    "patchtrace": "ours",
    "patchtrace_plain": "ours",
    "hooks": "hooks",
    "transformer_lens": "tlens",
    "nnsight": "nnsight_peer",
    "pyvene": "pyvene_peer",
    "atp": "atp",
}
