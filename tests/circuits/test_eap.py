"""EAP / EAP-IG against finite differences of the naive HF-hook reference, in float64.

An edge's EAP score is the derivative of the metric along ``ε ↦ (receiver v's input + ε·Δ_u)``; the
reference computes it by autograd through the plain HF forward with that hook (circuit_reference.py;
``ε`` is the only tensor it differentiates, so nothing of patchtrace's backward is reused),
at the base run (EAP), at interpolated input embeddings (EAP-IG inputs) and with one sender group
interpolated (EAP-IG activations).
"""

from __future__ import annotations

import circuit_reference as ref
import pytest
import torch

from conftest import make_tiny
from patchtrace import make_task
from patchtrace.circuits.eap import scores
from patchtrace.circuits.exact import edge_grid, prepare
from patchtrace.circuits.graph import CircuitError

EDGES = ("input -> a1.h3<q>", "a0.h1 -> a2.kv1<v>", "a1.h2 -> m1", "m0 -> a2.kv0<k>", "m2 -> logits", "a2.h0 -> logits")
STEPS = 2


@pytest.fixture(scope="module", params=("llama", "gpt2"))
def setup(request, smol_tokenizer):
    m = make_tiny(request.param, tokenizer=smol_tokenizer)
    m.hf.double()
    t = make_task("ioi", n=2, seed=2).tokenize(smol_tokenizer)
    clean, corrupt = t.ids("clean", range(2)), t.ids("corrupt", range(2))
    src, base = ref.senders(m.hf, corrupt), ref.senders(m.hf, clean)
    return m, t, clean, src, base


def _deriv(m, t, clean, fixed_dir, recv, sender_add=None):
    eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        lg = ref.patched_logits.__wrapped__(m.hf, clean, {}, [], fixed={recv: eps * fixed_dir}, sender_add=sender_add)
        (d,) = torch.autograd.grad(ref.logit_diff(lg, t.answer, t.wrong).mean(), eps)
    return float(d)


def _edge(e):
    u, v = (x.strip() for x in e.split("->"))
    return u, v


def test_eap_is_the_derivative_at_the_clean_run(setup):
    m, t, clean, src, base = setup
    p = prepare(m, t)
    s = scores(p, "eap")
    G = p.graph
    for e in EDGES:
        u, v = _edge(e)
        want = _deriv(m, t, clean, src[u] - base[u], v)
        assert s[G.parse_edge(e)].item() == pytest.approx(want, rel=1e-5, abs=1e-7), e
    assert torch.isnan(s[~G.mask]).all() and torch.isfinite(s[G.mask]).all()


def test_eap_ig_inputs_averages_gradients_on_the_embedding_path(setup):
    m, t, clean, src, base = setup
    p = prepare(m, t)
    s = scores(p, "eap-ig", steps=STEPS)
    G = p.graph
    d_in = src["input"] - base["input"]
    for e in EDGES[:4]:
        u, v = _edge(e)
        # e~ + (k/m)(e − e~) = e + (1 − k/m)(e~ − e), k = 0..m−1
        want = sum(_deriv(m, t, clean, src[u] - base[u], v, {"input": (1 - k / STEPS) * d_in}) for k in range(STEPS)) / STEPS
        assert s[G.parse_edge(e)].item() == pytest.approx(want, rel=1e-5, abs=1e-7), e


def test_eap_ig_activations_interpolates_the_sender_group(setup):
    m, t, clean, src, base = setup
    p = prepare(m, t)
    s = scores(p, "eap-ig-act", steps=STEPS)
    G = p.graph
    H = m.dims.n_heads
    for e in ("a1.h2 -> m1", "m0 -> a2.kv0<k>", "input -> a1.h3<q>"):
        u, v = _edge(e)
        group = [f"a1.h{h}" for h in range(H)] if u.startswith("a1.") else [u]
        want = 0.0
        for k in range(1, STEPS + 1):
            w = 1 - k / STEPS  # α z(clean) + (1 − α) z(corrupt) = z(clean) + (1 − α)(z(corrupt) − z(clean))
            want += _deriv(m, t, clean, src[u] - base[u], v, {x: w * (src[x] - base[x]) for x in group})
        assert s[G.parse_edge(e)].item() == pytest.approx(want / STEPS, rel=1e-5, abs=1e-7), e


def test_eap_tracks_exact_edges_and_refuses_bad_settings(setup):
    m, t, *_ = setup
    p = prepare(m, t)
    G = p.graph
    ex = edge_grid(p, receivers=[G.receiver_index("logits"), G.receiver_index("m2")])
    cols = [G.receiver_index("logits"), G.receiver_index("m2")]
    a = ex[:, cols][G.mask[:, cols]]
    b = scores(p, "eap")[:, cols][G.mask[:, cols]]
    # the logits' and last MLP's edges are near-linear: the estimate follows the exact effects
    assert torch.corrcoef(torch.stack([a, b]).double())[0, 1] > 0.9
    with pytest.raises(CircuitError, match="variant"):
        scores(p, "eap-x")  # type: ignore[arg-type]
    with pytest.raises(CircuitError, match="steps"):
        scores(p, "eap-ig", steps=0)
