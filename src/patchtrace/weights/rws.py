"""Robust Weight Signatures (Cai, Zhang, Wang; ICML 2023) reproduced on scikit-learn's digits.

The idea: fine-tune one pretrained init ``θ0`` twice, on clean data (``θ_std``) and on data under a
corruption ``c`` (``θ_c``). What makes ``θ_c`` robust is in ``Δ_c = θ_c − θ0`` minus what the clean
fine-tune also did, so per tensor ``RWS_c = Δ_c − proj_{δ}(Δ_c)`` with ``δ = θ_std − θ0``, kept on the
shallow layers only (the paper's ``keep_num``). Adding ``RWS_c`` to the clean model patches in
robustness to ``c``; signatures quantize, scale, compose, remove exactly, and transfer.

:func:`train_checkpoints` trains everything (seeded, CPU, seconds to minutes): ``θ0`` on a pretraining
split, then per data split (``A``, ``B``) and seed a clean fine-tune and one fine-tune per corruption.
:func:`run_rws` measures the paper's six observations on a held-out test split and returns an
:class:`RWSResult` (tables as dicts; ``benchmarks/rws.py`` renders them).

Choices, and why: no batch norm in the CNN (the paper's ResNet results hinge on BN statistics, which
are not weights; VGG has none either); fine-tunes use SGD with momentum at lr 0.01 like the paper's
``train_corruption.py``; the robust fine-tune sees only corrupted images, a fresh draw each epoch;
composition weights are used once (linear), not squared as in the reference code.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from patchtrace.progress import Progress, counter
from patchtrace.weights.digits import DigitsCNN, corrupt, corruption, load_digits_tensors
from patchtrace.weights.errors import WeightPatchError
from patchtrace.weights.finetune import finetune
from patchtrace.weights.patch import WeightPatch

State = dict[str, Tensor]


@dataclass(frozen=True)
class RWSConfig:
    """Everything that defines a run (all seeded).

    Attributes:
        corruptions: registered corruption names (:mod:`patchtrace.weights.digits`).
        keep: the shallow layers a signature keeps (tensor-name prefixes of :class:`DigitsCNN`).
        splits: sizes of the pretraining split and of each fine-tuning split (A, B); the rest is test.
        seeds: fine-tuning seeds per split (for the similarity matrix).
        levels, scheme: the quantization of the main table; ``quant_grid`` lists more.
        alphas: the scaling sweep.
    """

    corruptions: tuple[str, ...] = ("gaussian_noise", "blur", "contrast", "pixelate")
    keep: tuple[str, ...] = ("conv1", "conv2")
    width: int = 16
    pretrain_size: int = 600
    split_size: int = 450
    pretrain_epochs: int = 40
    finetune_epochs: int = 20
    batch: int = 32
    lr_pretrain: float = 3e-3
    lr_finetune: float = 1e-2
    seeds: tuple[int, ...] = (0, 1)
    levels: int = 16
    scheme: str = "linear"
    quant_grid: tuple[tuple[str, int], ...] = (("linear", 4), ("linear", 16), ("log", 15), ("tanh", 16), ("linear", 256))
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
    shallow_finetune: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for c in self.corruptions:
            corruption(c)  # raises naming an unknown one
        bad = [k for k in self.keep if k not in DigitsCNN.LAYERS]
        if bad or not self.keep:
            raise WeightPatchError(f"RWSConfig.keep {self.keep!r}: layers are {', '.join(DigitsCNN.LAYERS)}")
        if min(self.pretrain_epochs, self.finetune_epochs, self.batch, len(self.seeds), len(self.corruptions)) < 1:
            raise WeightPatchError("RWSConfig: epochs, batch, seeds and corruptions must be ≥ 1")
        if self.pretrain_size + 2 * self.split_size >= 1797:
            raise WeightPatchError(f"RWSConfig: {self.pretrain_size} + 2×{self.split_size} leaves no test images of 1797")

    @classmethod
    def tiny(cls) -> RWSConfig:
        """The fast configuration of the test suite (same pipeline, two corruptions, few epochs)."""
        return cls(corruptions=("gaussian_noise", "contrast"), width=8, pretrain_size=500, split_size=300,
                   pretrain_epochs=12, finetune_epochs=6, seeds=(0,), quant_grid=(("linear", 16),), alphas=(0.0, 1.0),
                   shallow_finetune=False)


@dataclass
class Checkpoints:
    """``theta0``; ``clean[(split, seed)]``; ``robust[(split, seed, corruption)]`` (state dicts)."""

    theta0: State
    clean: dict[tuple[str, int], State] = field(default_factory=dict)
    robust: dict[tuple[str, int, str], State] = field(default_factory=dict)
    data: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


def _batches(x: Tensor, y: Tensor, batch: int, epochs: int, seed: int, corrupt_with: str | None) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for e in range(epochs):
        xe = corrupt(x, corrupt_with, seed * 1000 + e) if corrupt_with else x
        perm = torch.randperm(len(x), generator=g)
        out += [(xe[perm[i : i + batch]], y[perm[i : i + batch]]) for i in range(0, len(x), batch)]
    return out


def _ce(m: Any, b: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _train(state: State | None, cfg: RWSConfig, x: Tensor, y: Tensor, seed: int, corrupt_with: str | None,
           pretrain: bool) -> State:
    torch.manual_seed(seed)
    m = DigitsCNN(cfg.width)
    if state is not None:
        m.load_state_dict(state)
    epochs = cfg.pretrain_epochs if pretrain else cfg.finetune_epochs
    bs = _batches(x, y, cfg.batch, epochs, seed, corrupt_with)
    if pretrain:
        finetune(m, None, bs, _ce, steps=len(bs), lr=cfg.lr_pretrain)
    else:
        _sgd_momentum(m, bs, cfg.lr_finetune)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def shallow_finetune(ck: Checkpoints, cfg: RWSConfig, c: str, split: str = "A") -> State:
    """The clean model fine-tuned on corruption ``c`` with only the signature's layers (``cfg.keep``)
    trainable: how much robustness those layers *can* hold, the ceiling for a signature on them."""
    s0 = cfg.seeds[0]
    torch.manual_seed(s0 + 1)
    m = DigitsCNN(cfg.width)
    m.load_state_dict(ck.clean[(split, s0)])
    x, y = ck.data[split]
    keep = tuple(k + "." for k in cfg.keep)
    _sgd_momentum(m, _batches(x, y, cfg.batch, cfg.finetune_epochs, s0 + 1, c), cfg.lr_finetune,
                  [q for n, q in m.named_parameters() if n.startswith(keep)])
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _sgd_momentum(m: DigitsCNN, bs: list[tuple[Tensor, Tensor]], lr: float, params: list[Any] | None = None) -> None:
    opt = torch.optim.SGD(params if params is not None else m.parameters(), lr=lr, momentum=0.9)
    m.train()
    for b in bs:
        opt.zero_grad(set_to_none=True)
        _ce(m, b).backward()
        opt.step()


def split_data(cfg: RWSConfig) -> dict[str, tuple[Tensor, Tensor]]:
    """``pretrain``, ``A``, ``B`` and ``test`` splits of the digits (a seeded shuffle)."""
    x, y = load_digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    x, y = x[perm], y[perm]
    p, s = cfg.pretrain_size, cfg.split_size
    cuts = {"pretrain": (0, p), "A": (p, p + s), "B": (p + s, p + 2 * s), "test": (p + 2 * s, len(x))}
    return {k: (x[a:b], y[a:b]) for k, (a, b) in cuts.items()}


def train_checkpoints(cfg: RWSConfig, on_progress: Progress | None = None) -> Checkpoints:
    """θ0, and per split (A, B) and seed: the clean fine-tune and one per corruption."""
    data = split_data(cfg)
    runs = [(s, seed) for s in ("A", "B") for seed in cfg.seeds]
    tick = counter(on_progress, 1 + len(runs) * (1 + len(cfg.corruptions)))
    ck = Checkpoints(_train(None, cfg, *data["pretrain"], cfg.seed, None, pretrain=True), data=data)
    tick(1)
    for split, seed in runs:
        x, y = data[split]
        ck.clean[(split, seed)] = _train(ck.theta0, cfg, x, y, seed + 1, None, pretrain=False)
        tick(1)
        for c in cfg.corruptions:
            ck.robust[(split, seed, c)] = _train(ck.theta0, cfg, x, y, seed + 1, c, pretrain=False)
            tick(1)
    return ck


def keep_selector(layers: tuple[str, ...]) -> str:
    """The tensor selector of a set of :class:`DigitsCNN` layers (``"conv1.*,conv2.*"``)."""
    return ",".join(f"{k}.*" for k in layers)


def signature(ck: Checkpoints, split: str, seed: int, c: str, layers: tuple[str, ...]) -> WeightPatch:
    """``RWS_c``: the robust fine-tune's delta on ``layers``, the clean fine-tune's direction projected out,
    re-targeted at the clean model of the same split and seed."""
    sel = keep_selector(layers)
    clean = WeightPatch.extract(ck.theta0, ck.clean[(split, seed)], sel)
    robust = WeightPatch.extract(ck.theta0, ck.robust[(split, seed, c)], sel, meta={"name": f"RWS_{c}"})
    return robust.project_out(clean).for_base(ck.clean[(split, seed)])


@dataclass
class RWSResult:
    """Measured numbers of :func:`run_rws` (plain dicts, JSON-able via :meth:`to_dict`)."""

    config: dict[str, Any]
    accuracy: dict[str, dict[str, float]]
    layer_norms: dict[str, dict[str, float]]
    depth: dict[str, dict[str, float]]
    similarity: dict[str, Any]
    quant: list[dict[str, Any]]
    alpha: dict[str, list[list[float]]]
    bytes: dict[str, int]
    removed_exact: bool
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_rws(cfg: RWSConfig | None = None, on_progress: Progress | None = None, ck: Checkpoints | None = None) -> RWSResult:
    """Train (unless ``ck`` is given) and measure observations (i)–(vi); see the module docstring."""
    from patchtrace.weights import rws_eval

    cfg = cfg or RWSConfig()
    t0 = time.perf_counter()
    ck = ck or train_checkpoints(cfg, on_progress)
    t1 = time.perf_counter()
    res = rws_eval.measure(cfg, ck)
    res.seconds = {"train": t1 - t0, "measure": time.perf_counter() - t1}
    return res


__all__ = ["Checkpoints", "RWSConfig", "RWSResult", "keep_selector", "run_rws", "shallow_finetune", "signature",
           "split_data", "train_checkpoints"]
