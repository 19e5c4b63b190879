"""The method contract: every registered method, the same invariants, no per-method code here.

Parametrized over :func:`patchtrace.methods.list_methods` at collection time, so a method registered
tomorrow is checked the day it is registered. Each method runs on a tiny random Llama (SmolLM2
tokenizer) with the small task and fast config its :class:`MethodSpec` provides, and must:

* return cells that are exactly the sites the ``SiteSpec`` asked for (axes, sizes, labels, order) —
  the expected grid is derived here from the Hugging Face config, not from patchtrace's grid code;
* report the baselines it declares as plain forwards equal to the metric of a plain Hugging Face
  forward (``model.hf(ids).logits``), computed here from the metric's definition;
* save and load back bit for bit (every tensor byte-equal, every JSON field equal, a re-save
  byte-identical);
* give the bitwise-same result when run again with the same config (seeds included);
* leave the weights, their grad flags, the modules' hooks and attributes, and every class in the
  modules' MROs exactly as they were (no monkey-patching of transformers or torch);
* report progress as ``on_progress(done, total)``: fixed total, non-decreasing, ending at total;
* have a frozen, keyword-only config that refuses, when built, a wrong-typed value in every field
  and each invalid setting the spec declares, with a :class:`PatchtraceError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from conftest import make_tiny
from patchtrace.errors import PatchtraceError
from patchtrace.methods import get_method, list_methods
from patchtrace.sites import Site, SiteSpec
from patchtrace.tasks.base import TokenizedTask

NAMES = [m.name for m in list_methods()]
VOLATILE = {"created"}  # provenance keys that record wall-clock time


# -- running each method once per module -----------------------------------------------------------------


@dataclass
class Outcome:
    model: Any
    task: Any
    sites: Any
    config: Any
    result: Any
    calls: list[tuple[int, int]]
    changed: list[str]


def snapshot(model) -> dict[str, Any]:
    """Everything a method must leave as it found it."""
    hf = model.hf
    classes = {c for m in hf.modules() for c in type(m).__mro__ if c is not object}
    mods = dict(hf.named_modules())
    return {
        "state": {k: v.detach().clone() for k, v in hf.state_dict().items()},
        "flags": {k: (p.requires_grad, p.grad is None) for k, p in hf.named_parameters()},
        "classes": {c: dict(vars(c)) for c in classes},
        "attrs": {n: set(vars(m)) for n, m in mods.items()},
        "hooks": {n: [len(getattr(m, h)) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")]
                  for n, m in mods.items()},
        "training": {n: m.training for n, m in mods.items()},
        "config": hf.config.to_json_string(),
        "attn": getattr(hf.config, "_attn_implementation", None),
        "global_hooks": [len(h) for h in (torch.nn.modules.module._global_forward_hooks,
                                          torch.nn.modules.module._global_forward_pre_hooks)],
    }


def changes(before: dict[str, Any], model) -> list[str]:
    """What differs from ``before`` (empty when nothing does)."""
    now = snapshot(model)
    out = [f"weight {k}" for k, v in before["state"].items() if not torch.equal(v, now["state"][k])]
    out += [f"{key} {k}" for key in ("flags", "attrs", "hooks", "training")
            for k, v in before[key].items() if now[key].get(k) != v]
    for cls, attrs in before["classes"].items():
        new = now["classes"].get(cls, {})
        out += [f"{cls.__qualname__}.{a}" for a in set(attrs) | set(new) if attrs.get(a) is not new.get(a)]
    out += [k for k in ("config", "attn", "global_hooks") if before[k] != now[k]]
    return out


@pytest.fixture(scope="module")
def outcome(smol_tokenizer):
    cache: dict[str, Outcome] = {}

    def get(name: str) -> Outcome:
        if name not in cache:
            spec = get_method(name)
            model = make_tiny("llama", seed=0, tokenizer=smol_tokenizer)
            task, sites = spec.tiny_inputs(model)
            config = spec.tiny_config()
            before = snapshot(model)
            calls: list[tuple[int, int]] = []
            result = spec.run(model, task, sites, config, on_progress=lambda d, t: calls.append((d, t)))
            cache[name] = Outcome(model, task, sites, config, result, calls, changes(before, model))
        return cache[name]

    return get


# -- comparing results bit for bit ----------------------------------------------------------------------


def _json(x: Any) -> str:
    return json.dumps(x, default=str, sort_keys=True)


def differences(a: Any, b: Any, where: str = "result", skip: frozenset[str] = frozenset()) -> list[str]:
    """Where ``a`` and ``b`` differ: tensors byte for byte, containers recursively, the rest as JSON."""
    if isinstance(a, Tensor):
        if not isinstance(b, Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return [f"{where}: {a.dtype}{tuple(a.shape)} vs {getattr(b, 'dtype', type(b))}{tuple(getattr(b, 'shape', ()))}"]
        same = torch.equal(a.detach().cpu().contiguous().flatten().view(torch.uint8),
                           b.detach().cpu().contiguous().flatten().view(torch.uint8))
        return [] if same else [f"{where}: tensor bytes differ"]
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return [d for f in dataclasses.fields(a)
                for d in differences(getattr(a, f.name), getattr(b, f.name, None), f"{where}.{f.name}", skip)]
    if isinstance(a, Mapping):
        if not isinstance(b, Mapping) or set(a) - skip != set(b) - skip:
            return [f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b)) if isinstance(b, Mapping) else b}"]
        return [d for k in a if k not in skip for d in differences(a[k], b[k], f"{where}[{k!r}]", skip)]
    if isinstance(a, list | tuple):
        if not isinstance(b, list | tuple) or len(a) != len(b):
            return [f"{where}: length {len(a)} vs {b!r}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{where}[{i}]", skip)]
    return [] if _json(a) == _json(b) else [f"{where}: {a!r} vs {b!r}"]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- the expected grid, from the Hugging Face config -----------------------------------------------------


def expected_sites(spec: SiteSpec, hf_config: Any, T: int) -> list[Site]:
    """The sites a SiteSpec asks for, row-major, from the model's own config."""
    L = hf_config.num_hidden_layers
    units = {"head": hf_config.num_attention_heads, "q": hf_config.num_attention_heads,
             "pattern": hf_config.num_attention_heads, "k": hf_config.num_key_value_heads,
             "v": hf_config.num_key_value_heads, "neuron": hf_config.intermediate_size}
    layers: list[int | None] = [None] if spec.kind == "embed" else list(spec.layers or range(L))
    unit_list: list[int | None] = list(spec.units or range(units[spec.kind])) if spec.per_unit else [None]
    pos = spec.positions
    poss: list[int | None] = ([-1] if pos == "last" else [None] if pos is None
                              else list(range(T)) if pos == "all" else list(pos))
    return [Site(spec.kind, layer, u, p) for layer in layers for u in unit_list for p in poss]  # type: ignore[arg-type]


def cells(result: Any) -> list[Site]:
    """The sites a result covers: a grid's cells (Scores) or a list of components (e.g. a mask)."""
    if hasattr(result, "grid"):
        return result.grid.sites()
    return list(result.sites)


# -- the metric, from its definition ---------------------------------------------------------------------


def plain_metric(model, task, which: str, metric: str) -> float:
    """Mean metric of a plain HF forward of every example's ``which`` prompt (last position)."""
    tokz = model.tokenizer
    vals = []
    for ex in task.examples:
        ids = torch.tensor([tokz(getattr(ex, which)).input_ids])
        with torch.no_grad():
            logits = model.hf(ids).logits[0, -1].double()
        ans = [tokz(a, add_special_tokens=False).input_ids[0] for a in ((ex.answer,) if isinstance(ex.answer, str) else ex.answer)]
        wrg = [tokz(w, add_special_tokens=False).input_ids[0] for w in ((ex.wrong,) if isinstance(ex.wrong, str) else ex.wrong)]
        logp = logits - torch.logsumexp(logits, 0)
        vals.append({
            "logit_diff": float(logits[ans].mean() - logits[wrg].mean()),
            "prob": float(logp[ans].exp().sum()),
            "logprob": float(torch.logsumexp(logp[ans], 0)),
        }[metric])
    return sum(vals) / len(vals)


# -- the contract ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_cells_are_the_sites_asked_for(outcome, name):
    o = outcome(name)
    if not isinstance(o.sites, SiteSpec):
        pytest.skip(f"{name}'s tiny sites are not one SiteSpec")
    task = o.task.task if isinstance(o.task, TokenizedTask) else o.task
    T = len(o.model.tokenizer(task.examples[0].clean).input_ids)
    want = expected_sites(o.sites, o.model.hf.config, T)
    got = cells(o.result)
    assert len(want) > 1, "non-vacuous: the tiny grid has several cells"
    assert got == want
    if hasattr(o.result, "grid"):  # the tensor's axes are the spec's, in order, sized as asked
        sizes = {"layer": len({s.layer for s in want}), "pos": len({s.pos for s in want})}
        sizes.update(dict.fromkeys(("head", "kv_head", "neuron"), len({s.unit for s in want})))
        assert all(o.result.values.shape[i] == sizes[a] for i, a in enumerate(o.result.axes))
        assert math.prod(o.result.values.shape) == len(want)


@pytest.mark.parametrize("name", NAMES)
def test_baselines_are_plain_forwards(outcome, name):
    spec, o = get_method(name), outcome(name)
    if not spec.plain_baselines:
        pytest.skip(f"{name} declares no plain-forward baselines")
    task = o.task.task if isinstance(o.task, TokenizedTask) else o.task
    for which in spec.plain_baselines:
        ref = plain_metric(o.model, task, which, o.result.metric)
        assert o.result.baselines[which] == pytest.approx(ref, abs=1e-4, rel=1e-4), which
    if {"clean", "corrupt"} <= set(o.result.baselines):  # non-vacuous: the two runs differ
        assert abs(o.result.baselines["clean"] - o.result.baselines["corrupt"]) > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trips_bit_for_bit(outcome, name, tmp_path):
    spec, o = get_method(name), outcome(name)
    assert isinstance(o.result, spec.result)
    o.result.save(tmp_path / "a")
    back = spec.result.load(tmp_path / "a")
    assert differences(o.result, back) == []
    back.save(tmp_path / "b")
    first, second = files(tmp_path / "a"), files(tmp_path / "b")
    assert first and first == second


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_result_and_model_untouched(outcome, name):
    spec, o = get_method(name), outcome(name)
    assert o.changed == [], f"{name} left the model changed: {o.changed[:10]}"
    before = snapshot(o.model)
    again = spec.run(o.model, o.task, o.sites, o.config)
    assert changes(before, o.model) == []
    assert differences(o.result, again, skip=frozenset(VOLATILE)) == []


@pytest.mark.parametrize("name", NAMES)
def test_progress_protocol(outcome, name):
    calls = outcome(name).calls
    assert calls, f"{name} never called on_progress"
    totals = {t for _, t in calls}
    assert len(totals) == 1 and totals.pop() > 0
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and 0 <= dones[0] and dones[-1] == calls[-1][1]


@pytest.mark.parametrize("name", NAMES)
def test_config_frozen_keyword_only_and_checked_when_built(name):
    spec = get_method(name)
    cfg = spec.tiny_config()
    assert isinstance(cfg, spec.config) and isinstance(spec.config(), spec.config)
    assert spec.config.__dataclass_params__.frozen  # type: ignore[attr-defined]
    fields = dataclasses.fields(spec.config)
    assert all(f.kw_only for f in fields)
    if fields:
        with pytest.raises(TypeError):
            spec.config(getattr(cfg, fields[0].name))  # positional: refused
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, fields[0].name, getattr(cfg, fields[0].name))
    junk = object()
    for f in fields:  # every field is checked, at least for its type
        with pytest.raises(PatchtraceError, match=f.name):
            spec.config(**{f.name: junk})
    for bad in spec.invalid_configs:
        with pytest.raises(PatchtraceError) as e:
            spec.config(**bad)
        assert any(repr(v) in str(e.value) for v in bad.values()), f"{bad} → {e.value}"


# -- the checks themselves can fail ---------------------------------------------------------------------


def test_the_untouched_check_sees_patches_hooks_and_edits(smol_tokenizer):
    model = make_tiny("llama", seed=0, tokenizer=smol_tokenizer)
    before = snapshot(model)
    mlp_cls = type(model.hf.model.layers[0].mlp)
    original = mlp_cls.forward
    mlp_cls.forward = lambda self, x: original(self, x)  # a process-wide monkey-patch
    try:
        assert f"{mlp_cls.__qualname__}.forward" in changes(before, model)
    finally:
        mlp_cls.forward = original
    handle = model.hf.model.layers[1].register_forward_hook(lambda *a: None)
    assert changes(before, model) == ["hooks model.layers.1"]
    handle.remove()
    attn = model.hf.model.layers[0].self_attn
    attn.forward = attn.forward  # an instance-level patch
    assert changes(before, model) == ["attrs model.layers.0.self_attn"]
    del attn.forward
    w = model.hf.model.norm.weight
    old = w.detach().clone()
    with torch.no_grad():
        w[0] += 1e-3
    assert changes(before, model) == ["weight model.norm.weight"]
    with torch.no_grad():
        w.copy_(old)
    assert changes(before, model) == []


def test_the_bitwise_comparison_sees_one_ulp_and_one_json_field():
    x = torch.randn(4)
    y = x.clone()
    y[1] = torch.nextafter(y[1], torch.tensor(math.inf))
    assert differences({"v": x, "p": {"k": [1, 2]}}, {"v": x.clone(), "p": {"k": (1, 2)}}) == []
    assert differences({"v": x}, {"v": y}) == ["result['v']: tensor bytes differ"]
    assert differences({"v": x, "p": {"k": 1}}, {"v": x, "p": {"k": 2}}) == ["result['p']['k']: 1 vs 2"]
    assert differences({"v": x}, {"v": x.double()}) != []
    assert differences({"created": 1}, {"created": 2}, skip=frozenset(VOLATILE)) == []


def test_expected_sites_follow_the_spec(smol_tokenizer):
    cfg = make_tiny("llama", seed=0, tokenizer=smol_tokenizer).hf.config  # 3 layers, 4 heads, 2 KV heads
    got = expected_sites(SiteSpec("k", per_unit=True, positions=[0, -1], layers=(2,)), cfg, T=5)
    assert [str(s) for s in got] == ["k[2].h0@0", "k[2].h0@-1", "k[2].h1@0", "k[2].h1@-1"]
    assert [str(s) for s in expected_sites(SiteSpec("mlp_out", positions="last"), cfg, T=5)] == [
        "mlp_out[0]@-1", "mlp_out[1]@-1", "mlp_out[2]@-1"]
