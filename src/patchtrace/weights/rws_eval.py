"""The measurements of the RWS reproduction (observations (i)–(vi)); called by :func:`patchtrace.weights.rws.run_rws`.

Every number is an accuracy on the held-out test split, clean or under one corruption (a fixed
seeded draw), of the clean model ``θ_std`` (split A, first seed) patched in one way or another; the
patches are applied with :meth:`WeightPatch.applied` (scoped: the clean model is restored exactly
after each evaluation) and the base hash is checked on every apply except the transfer rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from patchtrace.weights.digits import DigitsCNN, accuracy, corrupt
from patchtrace.weights.patch import WeightPatch
from patchtrace.weights.rws import Checkpoints, RWSConfig, RWSResult, keep_selector, shallow_finetune, signature
from patchtrace.weights.state import base_hash


class _Eval:
    def __init__(self, cfg: RWSConfig, ck: Checkpoints) -> None:
        self.cfg = cfg
        self.m = DigitsCNN(cfg.width)
        x, y = ck.data["test"]
        self.sets = {"clean": (x, y), **{c: (corrupt(x, c, 10_000 + i), y) for i, c in enumerate(cfg.corruptions)}}

    def __call__(self, state: dict[str, Tensor], patches: Sequence[tuple[WeightPatch, float]] = (),
                 other_base: bool = False) -> dict[str, float]:
        self.m.load_state_dict(state)
        with contextlib.ExitStack() as stack:
            for p, a in patches:
                stack.enter_context(p.applied(self.m, a, allow_other_base=other_base))
                other_base = True  # the next patch sees the already-patched weights
            return {k: accuracy(self.m, x, y) for k, (x, y) in self.sets.items()}


def _layer_norm(state: dict[str, Tensor], layer: str) -> float:
    return float(torch.cat([v.flatten() for k, v in state.items() if k.startswith(layer + ".")]).double().norm())


def _diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: a[k] - b[k] for k in a}


def _cos_matrix(vecs: list[Tensor]) -> Tensor:
    v = torch.stack([x / x.norm() for x in vecs])
    return v @ v.T


def _within_across(sim: Tensor, groups: list[str]) -> dict[str, float]:
    n = len(groups)
    within = [float(sim[i, j]) for i in range(n) for j in range(n) if i != j and groups[i] == groups[j]]
    across = [float(sim[i, j]) for i in range(n) for j in range(n) if groups[i] != groups[j]]
    return {"within": sum(within) / max(len(within), 1), "across": sum(across) / max(len(across), 1)}


def measure(cfg: RWSConfig, ck: Checkpoints) -> RWSResult:
    """All tables of :class:`RWSResult` from trained checkpoints."""
    ev = _Eval(cfg, ck)
    cs, keep, s0 = cfg.corruptions, cfg.keep, cfg.seeds[0]
    clean = ck.clean[("A", s0)]
    rws = {c: signature(ck, "A", s0, c, keep) for c in cs}
    acc: dict[str, dict[str, float]] = {"theta0": ev(ck.theta0), "clean": ev(clean)}
    for c in cs:
        acc[f"robust:{c}"] = ev(ck.robust[("A", s0, c)])
        acc[f"clean+RWS:{c}"] = ev(clean, [(rws[c], 1.0)])
        acc[f"clean+RWS_q:{c}"] = ev(clean, [(rws[c].quantize(cfg.levels, cfg.scheme), 1.0)])
        acc[f"clean+RWS_all_layers:{c}"] = ev(clean, [(signature(ck, "A", s0, c, DigitsCNN.LAYERS), 1.0)])
        if cfg.shallow_finetune:
            acc[f"clean+shallow_ft:{c}"] = ev(shallow_finetune(ck, cfg, c))
    k = len(cs)
    acc["clean+composed"] = ev(clean, [(WeightPatch.compose([rws[c] for c in cs]), 1.0)])
    acc["clean+composed/K"] = ev(clean, [(WeightPatch.compose([rws[c] for c in cs], [1 / k] * k), 1.0)])
    # (vi) transfer: a signature from split A patches the clean model fine-tuned on split B
    acc["B:clean"] = ev(ck.clean[("B", s0)])
    for c in cs:
        acc[f"B:robust:{c}"] = ev(ck.robust[("B", s0, c)])
        acc[f"B:clean+RWS_A:{c}"] = ev(ck.clean[("B", s0)], [(rws[c], 1.0)], other_base=True)
    return RWSResult(
        config={**cfg.__dict__}, accuracy=acc, layer_norms=_norms(cfg, ck), depth=_depth(cfg, ck, ev),
        similarity=_similarity(cfg, ck), quant=_quant(cfg, rws, ev, clean), alpha=_alpha(cfg, rws, ev, clean),
        bytes=_bytes(cfg, rws), removed_exact=_remove_exact(cfg, rws, clean), seconds={},
    )


def _norms(cfg: RWSConfig, ck: Checkpoints) -> dict[str, dict[str, float]]:
    """(i) per layer, ‖Δ‖ / ‖θ0‖ of the clean and robust fine-tunes and of robust − clean."""
    s0, out = cfg.seeds[0], {}
    clean = ck.clean[("A", s0)]
    for layer in DigitsCNN.LAYERS:
        ref = _layer_norm(ck.theta0, layer)
        rob = [ck.robust[("A", s0, c)] for c in cfg.corruptions]
        rws = [signature(ck, "A", s0, c, (layer,)).deltas for c in cfg.corruptions]
        out[layer] = {
            "clean": _layer_norm(_diff(clean, ck.theta0), layer) / ref,
            "robust": sum(_layer_norm(_diff(r, ck.theta0), layer) for r in rob) / len(rob) / ref,
            "robust_minus_clean": sum(_layer_norm(_diff(r, clean), layer) for r in rob) / len(rob) / ref,
            "rws": sum(float(torch.cat([v.flatten() for v in d.values()]).double().norm()) for d in rws) / len(rws) / ref,
        }
    return out


def _mean_over(cfg: RWSConfig, rows: list[dict[str, float]]) -> dict[str, float]:
    return {"clean": sum(r["clean"] for r in rows) / len(rows),
            "corrupted": sum(r[c] for r, c in zip(rows, cfg.corruptions)) / len(rows)}


def _depth(cfg: RWSConfig, ck: Checkpoints, ev: _Eval) -> dict[str, dict[str, float]]:
    """Signatures on the first k layers, and on one layer only: clean and own-corruption accuracy (means)."""
    s0, L = cfg.seeds[0], DigitsCNN.LAYERS
    clean, out = ck.clean[("A", s0)], {}
    for name, layers in [*[(f"first{k}", L[:k]) for k in range(1, len(L) + 1)], *[(f"only:{x}", (x,)) for x in L]]:
        sigs = [signature(ck, "A", s0, c, layers) for c in cfg.corruptions]
        row = _mean_over(cfg, [ev(clean, [(p, 1.0)]) for p in sigs])
        out[name] = {**row, "bytes": sigs[0].nbytes}
    return out


def _similarity(cfg: RWSConfig, ck: Checkpoints) -> dict[str, Any]:
    """(ii) cosine similarity between signatures of every (corruption, split, seed); also of raw deltas."""
    labels, groups, proj, raw = [], [], [], []
    sel = keep_selector(cfg.keep)
    for c in cfg.corruptions:
        for split in ("A", "B"):
            for seed in cfg.seeds:
                p = signature(ck, split, seed, c, cfg.keep)
                r = WeightPatch.extract(ck.theta0, ck.robust[(split, seed, c)], sel)
                labels.append(f"{c}/{split}{seed}")
                groups.append(c)
                proj.append(torch.cat([v.flatten() for v in p.deltas.values()]).double())
                raw.append(torch.cat([v.flatten() for v in r.deltas.values()]).double())
    sim, sim_raw = _cos_matrix(proj), _cos_matrix(raw)
    return {"labels": labels, "matrix": sim.tolist(), "summary": _within_across(sim, groups),
            "raw_matrix": sim_raw.tolist(), "raw_summary": _within_across(sim_raw, groups)}


def _quant(cfg: RWSConfig, rws: dict[str, WeightPatch], ev: _Eval, clean: dict[str, Tensor]) -> list[dict[str, Any]]:
    """(iv) bytes and accuracies of quantized signatures (means over corruptions)."""
    rows = []
    model_bytes = next(iter(rws.values())).model_bytes
    for scheme, levels in [("float32", 0), *cfg.quant_grid]:
        ps = [p if scheme == "float32" else p.quantize(levels, scheme) for p in rws.values()]
        r = _mean_over(cfg, [ev(clean, [(p, 1.0)]) for p in ps])
        nb = sum(p.nbytes for p in ps) // len(ps)
        rows.append({"scheme": scheme, "levels": levels, "bytes": nb, "model_bytes": model_bytes,
                     "model_over_patch": model_bytes / nb, **r})
    return rows


def _alpha(cfg: RWSConfig, rws: dict[str, WeightPatch], ev: _Eval, clean: dict[str, Tensor]) -> dict[str, list[list[float]]]:
    """(v) scaling: [α, clean accuracy, own-corruption accuracy] per corruption."""
    out = {}
    for c, p in rws.items():
        rows = []
        for a in cfg.alphas:
            r = ev(clean, [(p, a)])
            rows.append([a, r["clean"], r[c]])
        out[c] = rows
    return out


def _bytes(cfg: RWSConfig, rws: dict[str, WeightPatch]) -> dict[str, int]:
    p = next(iter(rws.values()))
    return {"model": p.model_bytes, "signature_float32": p.nbytes,
            "signature_quantized": p.quantize(cfg.levels, cfg.scheme).nbytes, "keep_layers": p.selected_bytes}


def _remove_exact(cfg: RWSConfig, rws: dict[str, WeightPatch], clean: dict[str, Tensor]) -> bool:
    """(v) apply every signature in place, remove them in reverse order: bit for bit the clean model again?"""
    m = DigitsCNN(cfg.width)
    m.load_state_dict(clean)
    before = base_hash(m)
    receipts = []
    for i, p in enumerate(rws.values()):
        receipts.append((p, p.apply(m, allow_other_base=i > 0)))
    changed = base_hash(m) != before
    for p, r in reversed(receipts):
        p.remove(m, r)
    return changed and base_hash(m) == before and all(torch.equal(m.state_dict()[k], v) for k, v in clean.items())


__all__ = ["measure"]
