"""Localization methods on encoders (tiny random BERT and RoBERTa masked LMs), each against an
independent reference written here with plain forward hooks and autograd on the HF modules (no
patchtrace code): AtP, integrated gradients (inputs and site paths), RelP (LRP rules as hooks),
causal tracing (resid and MLP windows, fast and plain engine paths) and ``compare``; AtP* and DBM
are refused by name before any forward.

The metric is read at each prompt's ``[MASK]`` (positions 6 and 1: not the last). Attention is
bidirectional, so the tests also assert what a causal shortcut would get wrong: gradient estimates at
positions *after* the mask are non-zero, and restoring a state *before* the subject in causal tracing
has an effect (with causal attention it is exactly zero).

Where the sites are (the table of ``tests/models/test_encoder.py``): ``resid_pre`` = input of
``encoder.layer[L]``; ``resid_post`` = its output; ``head`` = input of ``attention.output.dense``
split ``[H, d]``; ``mlp_out`` = output of ``output.dense``; ``embed`` = output of ``embeddings``.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from patchtrace import SiteSpec
from patchtrace.methods import atp, atp_star, compare, ig, relp
from patchtrace.methods import causal_tracing as ct
from patchtrace.methods.dbm import api as dbm
from patchtrace.methods.dbm.config import DBMError
from patchtrace.methods.gradients import AttributionError
from patchtrace.models.load import wrap_model
from patchtrace.tasks.base import Example, Task
from tiny_encoder import FAMILIES, WORDS, tiny_encoder

ANS, WRONG = WORDS.index("paris"), WORDS.index("rome")
MASK_POS = torch.tensor([6, 1])
SUBJECT_POS = [[4], [6]]  # "france" in each clean prompt ([CLS] is position 0)


def _hf(family: str, seed: int = 0):
    return tiny_encoder(family, seed)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import BertTokenizerFast  # fast: causal tracing locates the subject by offsets

    return BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})


@pytest.fixture(scope="module", params=FAMILIES)
def enc(request, tokenizer):
    return wrap_model(_hf(request.param), tokenizer, name=f"tiny-{request.param}")


@pytest.fixture(scope="module")
def task():
    return Task("capital", [
        Example("the capital of france is [MASK] and rome is in italy .",
                "the capital of italy is [MASK] and rome is in france .", "paris", "rome", {"subject": "france"}),
        Example("[MASK] is the capital of france and rome is in italy .",
                "[MASK] is the capital of italy and rome is in france .", "paris", "rome", {"subject": "france"}),
    ])


def _ids(tokenizer, task, which: str) -> torch.Tensor:
    return torch.tensor([tokenizer(getattr(e, which)).input_ids for e in task.examples])


# -- the independent reference: hooks and autograd on the HF modules ---------------------------------


def _base(hf):
    return hf.bert if hf.config.model_type == "bert" else hf.roberta


def _where(hf, kind: str, layer: int | None):
    if kind == "embed":
        return _base(hf).embeddings, "out"
    blk = _base(hf).encoder.layer[layer]
    return {"resid_pre": (blk, "in"), "resid_post": (blk, "out"), "head": (blk.attention.output.dense, "in"),
            "mlp_out": (blk.output.dense, "out")}[kind]


def _forward(hf, ids, keys, *, replace=None, grad=False):
    """HF logits ``[B, T, V]`` and the activations at ``keys`` (``(kind, layer)``), kept in the graph
    when ``grad``. ``replace[(kind, layer)] = fn(value) -> new value`` rewrites a site first."""
    rec: dict = {}
    replace = replace or {}
    handles = []
    for key in set(keys) | set(replace):
        mod, side = _where(hf, *key)

        def pre(m, args, key=key):
            x = replace[key](args[0]) if key in replace else args[0]
            rec[key] = x
            return (x, *args[1:])

        def post(m, args, out, key=key):
            x = replace[key](out) if key in replace else out
            rec[key] = x
            return x

        handles.append(mod.register_forward_pre_hook(pre) if side == "in" else mod.register_forward_hook(post))
    try:
        with torch.set_grad_enabled(grad):
            logits = hf(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, rec


def _logit_diff(logits):
    at = logits[torch.arange(logits.shape[0]), MASK_POS.repeat(logits.shape[0] // len(MASK_POS))]
    return at[:, ANS] - at[:, WRONG]


def _dot(kind: str, diff, grad, heads: int):
    """Σ over the site's features: ``[N, T]`` (``head``: ``[N, H, T]``)."""
    if kind == "head":
        return (diff.unflatten(-1, (heads, -1)) * grad.unflatten(-1, (heads, -1))).sum(-1).transpose(1, 2)
    return (diff * grad).sum(-1)


def _ref_gradient_estimate(hf, clean, corrupt, kind: str, alphas=(0.0,)):
    """Denoising AtP (``alphas=(0,)``) or inputs-path IG: per example ``[N, L, (H,) T]``.

    The gradient is averaged over embeddings ``e_corrupt + α (e_clean − e_corrupt)``."""
    L, H = hf.config.num_hidden_layers, hf.config.num_attention_heads
    keys = [(kind, li) for li in range(L)]
    _, src = _forward(hf, clean, [*keys, ("embed", None)])
    _, base = _forward(hf, corrupt, [*keys, ("embed", None)])
    e_src, e_base = src[("embed", None)], base[("embed", None)]
    total = [torch.zeros_like(base[k]) for k in keys]
    for a in alphas:
        e = (e_base + a * (e_src - e_base)).requires_grad_(True)  # a leaf: the HF weights may be frozen
        logits, rec = _forward(hf, corrupt, keys, replace={("embed", None): lambda _, e=e: e}, grad=True)
        gs = torch.autograd.grad(_logit_diff(logits).sum(), [rec[k] for k in keys])
        total = [t + g / len(alphas) for t, g in zip(total, gs, strict=True)]
    return torch.stack([_dot(kind, src[k] - base[k], g, H) for k, g in zip(keys, total, strict=True)], 1)


@contextlib.contextmanager
def _lrp_rules(hf):
    """RelP's default rules as hooks: every LayerNorm's scale a constant (LN rule), every activation
    ``y = f(x)`` passing gradient as ``x · (y / x̂)`` with ``x̂ = x + (sign(x) + [x = 0])·1e-6``
    (identity rule); forward values unchanged."""

    def same(value, surrogate):
        return value.detach() + (surrogate - surrogate.detach())

    def identity(x, y):
        return same(y, x * (y / (x + (torch.sign(x) + (x == 0).float()) * 1e-6)).detach())

    def ln_rule(m, args, out):
        xc = args[0] - args[0].mean(-1, keepdim=True)
        return same(out, xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + m.eps).detach() * m.weight + m.bias)

    handles = [m.register_forward_hook(ln_rule) for m in hf.modules() if isinstance(m, torch.nn.LayerNorm)]
    acts = [blk.intermediate.intermediate_act_fn for blk in _base(hf).encoder.layer]
    if hf.config.model_type == "bert":
        acts.append(hf.cls.predictions.transform.transform_act_fn)
    else:  # RobertaLMHead calls the gelu function between its dense layer and its LayerNorm
        seen = {}
        handles.append(hf.lm_head.dense.register_forward_hook(lambda m, a, out: seen.update(x=out)))
        handles.append(hf.lm_head.layer_norm.register_forward_pre_hook(lambda m, a: (identity(seen["x"], a[0]),)))
    handles += [m.register_forward_hook(lambda m, args, out: identity(args[0], out)) for m in acts]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _ref_ig_site(hf, clean, corrupt, layer: int, alphas):
    """Site-path IG of ``resid_pre[layer]``: interpolate the layer's input at every position."""
    key = ("resid_pre", layer)
    _, src = _forward(hf, clean, [key])
    _, base = _forward(hf, corrupt, [key])
    d = src[key] - base[key]
    total = torch.zeros_like(d)
    for a in alphas:
        leaf = (base[key] + a * d).requires_grad_(True)
        logits, _ = _forward(hf, corrupt, [], replace={key: lambda x, leaf=leaf: leaf}, grad=True)
        (g,) = torch.autograd.grad(_logit_diff(logits).sum(), [leaf])
        total = total + g / len(alphas)
    return (d * total).sum(-1)  # [N, T]


def _ref_trace(hf, clean, *, samples: int, seed: int, scale: float, kind: str, window: int):
    """ROME's indirect effects ``[N, L, T]`` (prob of the clean top-1 token at the mask), naively."""
    N, T = clean.shape
    L = hf.config.num_hidden_layers
    site = "resid_post" if kind == "resid" else "mlp_out"
    keys = [(site, li) for li in range(L)]
    logits, cl = _forward(hf, clean, [*keys, ("embed", None)])
    target = logits[torch.arange(N), MASK_POS].argmax(-1)
    emb = cl[("embed", None)]
    sigma = float(torch.cat([emb[i, p].reshape(-1) for i, p in enumerate(SUBJECT_POS)]).std())
    g = torch.Generator().manual_seed(seed)
    noise = torch.zeros(N * samples, T, emb.shape[-1])
    for i, p in enumerate(SUBJECT_POS):  # the documented draw order: example by example, [S, |subject|, D]
        noise[i * samples:(i + 1) * samples, p] = scale * sigma * torch.randn(samples, len(p), emb.shape[-1], generator=g)
    rows = clean.repeat_interleave(samples, 0)
    ro = MASK_POS.repeat_interleave(samples)
    tgt = target.repeat_interleave(samples)

    def prob(replace):
        lg, _ = _forward(hf, rows, [], replace={("embed", None): lambda e: e + noise, **replace})
        return torch.softmax(lg[torch.arange(len(rows)), ro], -1)[torch.arange(len(rows)), tgt].view(N, samples).mean(1)

    def restore(li, t):
        def fn(x, li=li, t=t):
            x = x.clone()
            x[:, t] = cl[(site, li)].repeat_interleave(samples, 0)[:, t]
            return x
        return fn

    noisy = prob({})
    out = torch.zeros(N, L, T)
    for layer in range(L):
        layers = [layer] if kind == "resid" else range(max(0, layer - window // 2), min(L, layer + math.ceil(window / 2)))
        for t in range(T):
            out[:, layer, t] = prob({(site, li): restore(li, t) for li in layers}) - noisy
    return out


# -- the tests ---------------------------------------------------------------------------------------


def _after_mask(T: int) -> torch.Tensor:
    """``[N, T]``: positions after each example's mask (a causal model's gradients there are zero)."""
    return torch.arange(T)[None] > MASK_POS[:, None]


@pytest.mark.parametrize("kind", ["resid_pre", "head", "mlp_out"])
def test_atp_equals_autograd_reference_at_the_mask(enc, tokenizer, task, kind):
    clean, corrupt = _ids(tokenizer, task, "clean"), _ids(tokenizer, task, "corrupt")
    spec = SiteSpec(kind, per_unit=kind == "head", positions="all")
    got = atp.run(enc, task, spec).per_example
    ref = _ref_gradient_estimate(enc.hf, clean, corrupt, kind)
    assert got is not None and got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-5
    # bidirectional: positions after the mask carry gradient (below the last layer)
    after = ref[:, :-1].movedim(-1, 1)[_after_mask(clean.shape[1])]
    assert after.abs().max() > 1e-3


def test_relp_equals_lrp_hook_reference(enc, tokenizer, task):
    clean, corrupt = _ids(tokenizer, task, "clean"), _ids(tokenizer, task, "corrupt")
    got = relp.run(enc, task, SiteSpec("resid_pre", positions="all")).per_example
    with _lrp_rules(enc.hf):
        ref = _ref_gradient_estimate(enc.hf, clean, corrupt, "resid_pre")
    plain = _ref_gradient_estimate(enc.hf, clean, corrupt, "resid_pre")
    assert got is not None and (got - ref).abs().max() <= 1e-5
    assert (ref - plain).abs().max() > 1e-3  # the rules change the backward (every post-add LayerNorm included)
    assert ref[:, 1][_after_mask(clean.shape[1])].abs().max() > 1e-3


def test_ig_inputs_path_equals_reference(enc, tokenizer, task):
    clean, corrupt = _ids(tokenizer, task, "clean"), _ids(tokenizer, task, "corrupt")
    got = ig.run(enc, task, SiteSpec("resid_pre", positions="all"), ig.IGConfig(steps=3)).per_example
    ref = _ref_gradient_estimate(enc.hf, clean, corrupt, "resid_pre", alphas=(0.0, 1 / 3, 2 / 3))
    assert got is not None and (got - ref).abs().max() <= 1e-5
    assert ref[:, 1][_after_mask(clean.shape[1])].abs().max() > 1e-3


def test_ig_site_path_equals_reference(enc, tokenizer, task):
    clean, corrupt = _ids(tokenizer, task, "clean"), _ids(tokenizer, task, "corrupt")
    cfg = ig.IGConfig(steps=2, path="site", rule="midpoint")
    got = ig.run(enc, task, SiteSpec("resid_pre", positions="all", layers=(1,)), cfg).per_example
    ref = _ref_ig_site(enc.hf, clean, corrupt, 1, alphas=(0.25, 0.75))
    assert got is not None and (got[:, 0] - ref).abs().max() <= 1e-5
    assert ref[_after_mask(clean.shape[1])].abs().max() > 1e-3


@pytest.mark.parametrize(("kind", "fast"), [("resid", True), ("resid", False), ("mlp", True)])
def test_causal_tracing_equals_reference(enc, tokenizer, task, kind, fast):
    cfg = ct.TracingConfig(samples=2, kind=kind, window=2, fast=fast)
    got = ct.run(enc, task, None, cfg)
    clean = _ids(tokenizer, task, "clean")
    ref = _ref_trace(enc.hf, clean, samples=2, seed=0, scale=3.0, kind=kind, window=2)
    assert got.per_example is not None and (got.per_example - ref).abs().max() <= 1e-6
    assert got.provenance["subject_positions"] == SUBJECT_POS
    # bidirectional: restoring a state *before* the subject matters (a causal model: exactly 0)
    before = torch.cat([ref[i, 0, : SUBJECT_POS[i][0]] for i in range(2)])
    assert before.abs().max() > 1e-4
    assert torch.cat([got.per_example[i, 0, : SUBJECT_POS[i][0]] for i in range(2)]).abs().max() > 1e-4


def test_compare_runs_what_carries_over_and_skips_the_rest(enc, tokenizer, task):
    clean, corrupt = _ids(tokenizer, task, "clean"), _ids(tokenizer, task, "corrupt")
    res = compare.run(enc, task, [SiteSpec("resid_pre", positions="all")],
                      config=compare.CompareConfig(options={"ig": {"steps": 2}}))
    assert set(res.report["skipped"]) == {"atp_star"}
    assert set(res.scores) == {"activation_patching", "atp", "ig", "relp"}
    ref = _ref_gradient_estimate(enc.hf, clean, corrupt, "resid_pre")
    assert (res.scores["atp"][0].values - ref.mean(0)).abs().max() <= 1e-5
    assert -1.0 <= res.report["kinds"]["resid_pre"]["atp"]["pearson"] <= 1.0


def test_methods_that_do_not_carry_over_are_refused_before_any_forward(enc, task, monkeypatch):
    calls = []
    monkeypatch.setattr(enc.runner, "forward", lambda *a, **k: calls.append(1))
    spec = SiteSpec("resid_pre", positions="all")
    name = enc.family.name
    with pytest.raises(AttributionError, match=f"atp_star does not support {name}.*qk_fix.*causal mask"):
        atp_star.run(enc, task, spec)
    with pytest.raises(AttributionError, match="atp_star does not support"):
        compare.run(enc, task, [spec], ["atp", "atp_star"])
    with pytest.raises(DBMError, match=f"DBM does not support {name}.*bidirectional"):
        dbm.run(enc, task, "mlp_out")
    assert calls == []


def test_cli_trace_and_compare_on_a_bert_folder(tmp_path, tokenizer, task):
    """``patchtrace trace`` and ``compare`` with ``--model DIR`` (a saved tiny BERT) read the mask: the
    trace equals the reference; compare's default set skips AtP* and says why."""
    import json

    from typer.testing import CliRunner

    from patchtrace.cli import build_app
    from patchtrace.results import Scores

    hf = _hf("bert")
    hf.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    rows = [{"clean": e.clean, "corrupt": e.corrupt, "answer": e.answer, "wrong": e.wrong, **e.meta} for e in task.examples]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    app, cli = build_app(), CliRunner()
    common = ["--model", str(tmp_path / "bert"), "--task", str(tmp_path / "t.jsonl")]
    res = cli.invoke(app, ["trace", *common, "--samples", "2", "--out", str(tmp_path / "tr"), "-q"])
    assert res.exit_code == 0, res.output
    ref = _ref_trace(hf, _ids(tokenizer, task, "clean"), samples=2, seed=0, scale=3.0, kind="resid", window=10)
    got = Scores.load(tmp_path / "tr").per_example
    assert got is not None and (got - ref).abs().max() <= 1e-6
    res = cli.invoke(app, ["compare", *common, "--sites", "resid_pre", "--positions", "all", "--ig-steps", "2",
                           "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert "skipped atp_star on bert" in res.output
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert set(report["time_s"]) == {"activation_patching", "atp", "ig", "relp"}
