"""AtP*'s QK fix on a sliding-window layer (Gemma 3's local layers).

The fix recomputes attention softmaxes itself, so it must use the layer's own mask: a query sees only
the last ``window`` keys. The reference is the definition, computed with plain runner hooks: the
exact change of the pattern when the site is patched, times the metric's gradient at the pattern.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from patchtrace import SiteSpec, make_task
from patchtrace.methods import atp_star
from patchtrace.metrics import Metric
from patchtrace.sites import HookPoint


@pytest.fixture(scope="module")
def gemma3(smol_tokenizer):
    return make_tiny("gemma3", seed=1, tokenizer=smol_tokenizer)


@pytest.fixture(scope="module")
def task(smol_tokenizer):
    return make_task("ioi", n=4, seed=0).tokenize(smol_tokenizer)


def _record(model, ids, points, hooks=None):
    acts = {}
    hk = {hp: list(fns) for hp, fns in (hooks or {}).items()}
    for hp in points:
        hk.setdefault(hp, []).append(lambda x, c, hp=hp: acts.__setitem__(hp, x.detach().clone()))
    with torch.no_grad():
        model.runner.forward(ids, hooks=hk, explicit_attention=True)
    return acts


def _patch(kind, unit, pos, value):
    def fn(x, c):
        x = x.clone()
        if pos is None:
            x[:, :, unit] = value[:, :, unit]
        else:
            x[:, pos, unit] = value[:, pos, unit]
        return x

    return fn


@pytest.mark.parametrize("kind,pos", [("q", -1), ("k", "first_diff"), ("k", None)])
def test_qk_fix_uses_the_layers_window(gemma3, task, kind, pos):
    idx = list(range(len(task)))
    clean, corrupt = task.ids("clean", idx), task.ids("corrupt", idx)
    T = clean.shape[1]
    layer, unit = 2, 1  # a local layer above the first, so queries depend on the context
    window = gemma3.dims.window(layer)
    assert window is not None and window < T - 2  # the window cuts the prompt: the test can tell
    if pos == "first_diff":
        pos = int((clean[0] != corrupt[0]).nonzero()[0])  # keys before it are equal in both runs
    pat, hp = HookPoint("pattern", layer), HookPoint(kind, layer)
    src = _record(gemma3, clean, [hp])
    base = _record(gemma3, corrupt, [pat, HookPoint("q", layer), HookPoint("k", layer)])
    patched = _record(gemma3, corrupt, [pat], {hp: [_patch(kind, unit, pos, src[hp])]})
    leaf = base[pat].clone().requires_grad_(True)
    out = gemma3.runner.forward(corrupt, hooks={pat: [lambda x, c: leaf]}, explicit_attention=True)
    m = Metric("logit_diff").score(out.logits[:, -1], task.answer, task.wrong)
    (G,) = torch.autograd.grad(m.sum(), [leaf])
    ref = float(((patched[pat] - base[pat]) * G).sum() / len(task))
    spec = SiteSpec(kind, per_unit=True, positions=None if pos is None else [pos], layers=(layer,), units=(unit,))
    got = atp_star.run(gemma3, task, spec, atp_star.AtPStarConfig(grad_drop=False)).values.flatten()[0]
    assert abs(ref) > 1e-5
    assert float(got) == pytest.approx(ref, rel=1e-3, abs=1e-6)
    # the same fix under a global causal mask is wrong here: the window is what makes it exact
    q_src = src[hp] if kind == "q" else base[HookPoint("q", layer)]
    k_src = src[hp] if kind == "k" else base[HookPoint("k", layer)]
    r, joint = atp_star.qk_fix(kind, base[pat], G, base[HookPoint("q", layer)], base[HookPoint("k", layer)],
                               q_src, k_src, gemma3.dims.attn_scale, window=None)
    unwindowed = float((joint[:, unit] if pos is None else r[:, pos % T, unit]).sum() / len(task))
    assert abs(unwindowed - ref) > 1e-3 * max(abs(ref), 1e-3)
