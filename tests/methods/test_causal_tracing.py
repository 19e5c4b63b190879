"""Causal tracing against an independent naive implementation (plain HF forward + hooks).

The reference adds the same Gaussian noise to the embedding output of the subject tokens with a
hook on the HF embedding module, restores the clean hidden state(s) with hooks on the HF decoder
layers / sublayers (``tests/reference.py``), runs one full forward per (layer, token) over all noisy
rows, and averages the metric over noise samples. The noise is reproduced from the documented
seeding contract (σ over subject embedding entries; ``randn(samples, n_subject, D)`` per example,
in order, from a generator seeded with ``config.seed``).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from patchtrace.methods.causal_tracing import TracingConfig, run, subject_positions, window_layers
from patchtrace.sites import Site
from patchtrace.tasks import Example, Task, TaskError
from patchtrace.tasks.factual import factual
from reference import hf_run

TOL = 1e-5
FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen3", "gemma", "gemma3")


def _task(tokenizer, n: int = 2) -> Task:
    """Factual examples with single-token answers and one common token length."""
    t = factual(n=30, seed=0)

    def single(s: str) -> bool:
        return len(tokenizer(s, add_special_tokens=False).input_ids) == 1

    exs = [e for e in t.examples if single(e.answer) and single(e.wrong)]
    lens = [len(tokenizer(e.clean).input_ids) for e in exs]
    common = Counter(lens).most_common(1)[0][0]
    return Task("factual", [e for e, n_ in zip(exs, lens) if n_ == common][:n])


def _subject_positions_by_prefix(task: Task, tokenizer) -> list[list[int]]:
    """Independently: the tokens added when the subject is appended to the text before it."""
    out = []
    for e in task.examples:
        s = e.meta["subject"]
        i = e.clean.index(s)
        a = len(tokenizer(e.clean[:i].rstrip()).input_ids)
        b = len(tokenizer(e.clean[: i + len(s)]).input_ids)
        out.append(list(range(a, b)))
    return out


def _hf_embed(model, ids):
    """Embedding output as the reference's embed hook sees it (recorded through a plain HF forward)."""
    _, rec = hf_run(model, ids, record=[("embed", None)])
    return rec[("embed", None)]


def naive_trace(model, task: Task, cfg: TracingConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(effects [N, L, T], noisy metric [N], clean metric [N]) by one HF forward per cell."""
    tokz = model.tokenizer
    ids = torch.tensor([tokz(e.clean).input_ids for e in task.examples])
    N, T = ids.shape
    S, L = cfg.samples, model.hf.config.num_hidden_layers if hasattr(model.hf.config, "num_hidden_layers") else None
    L = L or model.hf.config.n_layer
    subj = _subject_positions_by_prefix(task, tokz)
    emb = _hf_embed(model, ids)
    sigma = torch.cat([emb[i, p].reshape(-1) for i, p in enumerate(subj)]).std()
    g = torch.Generator().manual_seed(cfg.seed)
    D = emb.shape[-1]
    noise = torch.zeros(N * S, T, D)
    for i, p in enumerate(subj):
        noise[i * S : (i + 1) * S, p] = cfg.noise_scale * sigma * torch.randn(S, len(p), D, generator=g)
    rows = ids.repeat_interleave(S, 0)
    kind = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}[cfg.kind]
    clean_logits, clean_rec = hf_run(model, rows, record=[(kind, j) for j in range(L)])
    lp_clean = torch.log_softmax(clean_logits[:, -1], -1)
    if cfg.target == "top1":
        target = lp_clean.argmax(-1)
    else:
        target = torch.tensor([tokz(e.answer, add_special_tokens=False).input_ids[0] for e in task.examples])
        target = target.repeat_interleave(S)

    def metric(logits):
        lp = torch.log_softmax(logits[:, -1].float(), -1).gather(1, target[:, None])[:, 0]
        v = lp.exp() if cfg.metric == "prob" else lp
        return v.view(N, S).mean(1)

    noisy_logits, _ = hf_run(model, rows, embed_add=noise)
    noisy = metric(noisy_logits)
    eff = torch.zeros(N, L, T)
    for layer in range(L):
        layers = [layer] if cfg.kind == "resid" else window_layers(layer, cfg.window, L)
        for t in range(T):
            reps = [(Site(kind, j, None, t), clean_rec[(kind, j)]) for j in layers]
            logits, _ = hf_run(model, rows, replace=reps, embed_add=noise)
            eff[:, layer, t] = metric(logits) - noisy
    return eff, noisy, metric(clean_logits)


@pytest.fixture(scope="module", params=FAMILIES)
def fam_model(request, smol_tokenizer):
    from conftest import make_tiny

    return make_tiny(request.param, tokenizer=smol_tokenizer)


def test_window_layers():
    assert window_layers(0, 10, 30) == list(range(0, 5))
    assert window_layers(15, 10, 30) == list(range(10, 20))
    assert window_layers(29, 10, 30) == list(range(24, 30))
    assert window_layers(5, 1, 30) == [5]
    assert window_layers(5, 3, 30) == [4, 5, 6]
    assert window_layers(1, 2, 3) == [0, 1]


def test_subject_positions_match_prefix_method(smol_tokenizer):
    t = factual(n=30, seed=1)
    a = subject_positions(t, smol_tokenizer)
    assert a == _subject_positions_by_prefix(t, smol_tokenizer)
    assert all(len(p) >= 1 for p in a)


@pytest.mark.parametrize(("kind", "window", "metric"), [("resid", 10, "logprob"), ("mlp", 2, "logprob"),
                                                        ("attn", 1, "logprob"), ("resid", 10, "prob")])
def test_trace_matches_naive(fam_model, kind, window, metric):
    model = fam_model
    task = _task(model.tokenizer)
    assert len(task) == 2
    cfg = TracingConfig(samples=3, seed=1, kind=kind, window=window, metric=metric)
    eff, noisy, clean = naive_trace(model, task, cfg)
    # non-vacuity: the noise moved the metric and some restoration moves it back
    tol = TOL if metric == "logprob" else 1e-7  # probabilities of a random model are ~1e-5
    assert float((noisy - clean).abs().max()) > 100 * tol
    assert float(eff.abs().max()) > 100 * tol
    for fast in (True, False):
        sc = run(model, task, config=TracingConfig(samples=3, seed=1, kind=kind, window=window, metric=metric, fast=fast))
        assert sc.axes == ("layer", "pos")
        err = float((sc.per_example - eff).abs().max())
        assert err < tol, f"{model.name} {kind} w={window} fast={fast}: max err {err:.3g}"
        assert float((sc.extras["corrupt_per_example"] - noisy).abs().max()) < tol
        assert float((sc.extras["clean_per_example"] - clean).abs().max()) < tol
        assert torch.allclose(sc.values, eff.mean(0), atol=tol)


def test_restoring_everything_recovers_clean(smol_tokenizer):
    """Restoring resid_post of the last layer at the last token gives the clean metric exactly."""
    from conftest import make_tiny

    model = make_tiny("llama", tokenizer=smol_tokenizer)
    task = _task(model.tokenizer)
    sc = run(model, task, config=TracingConfig(samples=2, metric="logprob"))
    last = sc.per_example[:, -1, -1] + sc.extras["corrupt_per_example"]
    assert float((last - sc.extras["clean_per_example"]).abs().max()) < TOL
    # and tokens before the first subject token cannot matter (the noise is not there yet)
    first = min(sc.provenance["subject_positions"][0])
    if first > 0:
        assert float(sc.per_example[0, :, :first].abs().max()) < TOL
    assert sc.provenance["noise_std"] == pytest.approx(3.0 * sc.provenance["sigma_emb"])


def test_same_seed_same_numbers_different_seed_differs(smol_tokenizer):
    from conftest import make_tiny

    model = make_tiny("gpt2", tokenizer=smol_tokenizer)
    task = _task(model.tokenizer)
    a = run(model, task, config=TracingConfig(samples=2, seed=0, metric="logprob"))
    b = run(model, task, config=TracingConfig(samples=2, seed=0, metric="logprob"))
    c = run(model, task, config=TracingConfig(samples=2, seed=5, metric="logprob"))
    assert torch.equal(a.values, b.values)
    assert not torch.allclose(a.values, c.values)


def test_errors(smol_tokenizer):
    from conftest import make_tiny

    model = make_tiny("llama", tokenizer=smol_tokenizer)
    no_subj = Task("t", [Example("The capital of France is", "The capital of Spain is", " Paris", " Madrid")])
    with pytest.raises(TaskError, match=r"example 0.*meta\['subject'\]"):
        run(model, no_subj)
    bad = Task("t", [Example("The capital of France is", "The capital of Spain is", " Paris", " Madrid",
                             {"subject": "Germany"})])
    with pytest.raises(TaskError, match="'Germany' does not occur"):
        run(model, bad)
    mixed = Task("t", [Example("The capital of France is", "The capital of Spain is", " Paris", " Madrid",
                               {"subject": "France"}),
                       Example("So the capital of France is", "So the capital of Spain is", " Paris", " Madrid",
                               {"subject": "France"})])
    with pytest.raises(TaskError, match="same token length"):
        run(model, mixed)
    with pytest.raises(ValueError, match="kind"):
        TracingConfig(kind="mlp_out")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window"):
        TracingConfig(window=0)
    from patchtrace.metrics import MetricError

    with pytest.raises(MetricError):
        TracingConfig(metric="accuracy")


def test_restored_runs_never_rerun_the_noisy_forward(smol_tokenizer, monkeypatch):
    """The noisy run records what the fast path reads once; blocks do not re-collect it."""
    from conftest import make_tiny
    from patchtrace.engine import sweep as sweep_mod
    from patchtrace.methods import causal_tracing as ct

    model = make_tiny("llama", tokenizer=smol_tokenizer)
    tok = _task(model.tokenizer).tokenize(model.tokenizer)
    monkeypatch.setattr(ct, "ROWS_PER_BLOCK", 2 * len(tok) * 3)  # several blocks
    calls: list[int] = []
    real = sweep_mod.collect

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(sweep_mod, "collect", counting)
    run(model, tok, config=TracingConfig(samples=2, metric="logprob"))
    assert calls == []
