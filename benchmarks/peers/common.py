"""What every tool in the side-by-side benchmark shares: the model, the prompts, the metric, the grids.

Every tool gets the SAME weights (``patchtrace.load_model()``, float32, handed over as ``model.hf``
and ``model.tokenizer``), the SAME token ids (patchtrace's ``make_task("ioi", n=16, seed=0)``) and
the same metric: the mean over the 16 prompts of logit(IO) − logit(S) at the last position, after
the patch (the *patched* metric; effects are that minus the corrupt baseline).

Four sweep configurations (the issue's (i)–(iv)). A *cell* is one patch, ``(layer, unit, pos)``
with ``unit = -1`` for a whole-vector site and ``pos`` absolute:

==============  ==============================================  ===============  =============
config          sites                                           full shape       cells
==============  ==============================================  ===============  =============
heads_last      o_proj input slice of one head, last position   [30, 9]          270
heads_all       same, every position                            [30, 9, 14]      3,780
resid_all       resid_pre (decoder-layer input), one position   [30, 14]         420
neurons_last    MLP hidden (down_proj input) unit, last pos.    [30, 1536]       46,080
==============  ==============================================  ===============  =============

Peers run a *measured subset* of the cells (every peer patch is one full forward, whatever the
cell, so the time scales linearly with the number of cells) and the result is extrapolated.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

N_EXAMPLES = 16
SEED = 0
HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

CONFIGS: dict[str, str] = {
    "heads_last": "(i) all 270 heads, last position",
    "heads_all": "(ii) all heads × all 14 positions",
    "resid_all": "(iii) resid_pre per layer × position",
    "neurons_last": "(iv) all 46,080 MLP neurons, last position",
}

# Cells each subset measures: (layers, units, positions) with None = all.
#   full  : everything (patchtrace fast path)
#   peer  : what peers (and our plain path) run; see the module docstring
#   lite  : fewer peer cells (a run on a busy machine must stay short)
#   quick : a few cells, for development on a busy machine
SUBSETS: dict[str, dict[str, tuple[Sequence[int] | None, Sequence[int] | None, Sequence[int] | None]]] = {
    "full": {
        "heads_last": (None, None, None),
        "heads_all": (None, None, None),
        "resid_all": (None, None, None),
        "neurons_last": (None, None, None),
    },
    "peer": {
        "heads_last": (None, None, None),
        "heads_all": ((0,), None, None),
        "resid_all": ((0, 15, 29), None, None),
        "neurons_last": ((0,), tuple(range(64)), None),
    },
    "lite": {
        "heads_last": ((21, 22, 23), None, None),
        "heads_all": ((0,), (0, 3), None),
        "resid_all": ((0, 29), None, None),
        "neurons_last": ((0,), tuple(range(16)), None),
    },
    # patchtrace itself on a busy machine (--ours-pair): every cell of layers 0 and 29 only. The fast
    # path resumes at the patched layer, so a cell's cost grows with the layers after it; the pair
    # (l, 29 − l) has the same mean remaining depth (15.5 layers) as the whole grid, so scaling by
    # 15 estimates the whole grid.
    "pair": {
        "heads_last": ((0, 29), None, None),
        "heads_all": ((0, 29), None, None),
        "resid_all": ((0, 29), None, None),
        "neurons_last": ((0, 29), None, None),
    },
    "quick": {
        "heads_last": ((23,), (0, 3, 7), None),
        "heads_all": ((23,), (3,), (0, 6, 13)),
        "resid_all": ((5,), None, (3, 13)),
        "neurons_last": ((23,), (0, 1, 2), None),
    },
}


@dataclass
class Bench:
    """Model, ids and metric shared by one child process."""

    model: Any  # patchtrace.Model
    task: Any  # patchtrace TokenizedTask
    clean: Tensor  # [N, T]
    corrupt: Tensor  # [N, T]
    answer: Tensor  # [N]
    wrong: Tensor  # [N]
    load_s: float

    @property
    def T(self) -> int:
        return int(self.clean.shape[1])

    def dims(self) -> tuple[int, int, int, int]:
        d = self.model.dims
        return d.n_layers, d.n_heads, d.d_head, d.d_mlp

    def metric(self, logits: Tensor) -> Tensor:
        """Mean logit(IO) − logit(S) at the last position; ``logits`` is ``[N, T, V]`` or ``[N, V]``."""
        last = logits[:, -1] if logits.ndim == 3 else logits
        ar = torch.arange(last.shape[0], device=last.device)
        return (last[ar, self.answer] - last[ar, self.wrong]).float().mean()


def load_bench() -> Bench:
    """Load SmolLM2 through patchtrace (float32) and tokenize the IOI task once."""
    from patchtrace import load_model, make_task

    t0 = time.perf_counter()
    model = load_model(device=os.environ.get("PATCHTRACE_BENCH_DEVICE", "cpu"))  # cuda: benchmarks/gpu_check.sh
    tok = make_task("ioi", n=N_EXAMPLES, seed=SEED).tokenize(model.tokenizer)
    groups = tok.groups()
    if len(groups) != 1:
        raise RuntimeError(f"IOI prompts must share one length for this benchmark; got {len(groups)} groups")
    idx = groups[0]
    return Bench(
        model=model,
        task=tok,
        clean=tok.ids("clean", idx).to(model.device),
        corrupt=tok.ids("corrupt", idx).to(model.device),
        answer=tok.answer[idx, 0].to(model.device),
        wrong=tok.wrong[idx, 0].to(model.device),
        load_s=time.perf_counter() - t0,
    )


def full_shape(config: str, b: Bench) -> tuple[int, ...]:
    L, H, _, M = b.dims()
    return {
        "heads_last": (L, H),
        "heads_all": (L, H, b.T),
        "resid_all": (L, b.T),
        "neurons_last": (L, M),
    }[config]


@dataclass(frozen=True)
class Cell:
    """One patch: layer, unit (head / neuron; -1 = whole vector), absolute position; ``index`` into the full matrix."""

    layer: int
    unit: int
    pos: int
    index: tuple[int, ...]


def cells(config: str, subset: str, b: Bench) -> list[Cell]:
    """The cells of ``config`` that ``subset`` measures, in layer-major order."""
    L, H, _, M = b.dims()
    T = b.T
    layers, units, positions = SUBSETS[subset][config]
    ls = list(layers) if layers is not None else list(range(L))
    out: list[Cell] = []
    if config == "heads_last":
        for layer in ls:
            for h in units if units is not None else range(H):
                out.append(Cell(layer, h, T - 1, (layer, h)))
    elif config == "heads_all":
        for layer in ls:
            for h in units if units is not None else range(H):
                for p in positions if positions is not None else range(T):
                    out.append(Cell(layer, h, p, (layer, h, p)))
    elif config == "resid_all":
        for layer in ls:
            for p in positions if positions is not None else range(T):
                out.append(Cell(layer, -1, p, (layer, p)))
    elif config == "neurons_last":
        for layer in ls:
            for n in units if units is not None else range(M):
                out.append(Cell(layer, n, T - 1, (layer, n)))
    else:
        raise ValueError(f"unknown config {config!r}; choose from {', '.join(CONFIGS)}")
    return out


def n_full(config: str, b: Bench) -> int:
    return len(cells(config, "full", b))


def scatter(config: str, b: Bench, cs: Sequence[Cell], values: Sequence[float] | Tensor) -> Tensor:
    """Put per-cell values into the full matrix, NaN where not measured."""
    out = torch.full(full_shape(config, b), float("nan"))
    vals = torch.as_tensor(values, dtype=torch.float32).flatten()
    for c, v in zip(cs, vals.tolist(), strict=True):
        out[c.index] = v
    return out


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0
