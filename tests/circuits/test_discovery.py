"""Circuit discovery, pruning, faithfulness and the Circuit result on a tiny GQA Llama.

Faithfulness numbers are checked against the HF-hook reference (circuit_reference.py): "outside" is
the clean run with every non-circuit edge delivering the corrupt value, "restore" the corrupt run with
every circuit edge delivering the clean value.
"""

from __future__ import annotations

import circuit_reference as ref
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny
from patchtrace import make_task
from patchtrace.circuits import discovery
from patchtrace.circuits.circuit import Circuit
from patchtrace.circuits.eap import scores
from patchtrace.circuits.edges import agreement, as_scores
from patchtrace.circuits.exact import evaluate_sets, prepare
from patchtrace.circuits.faithfulness import curve, faithfulness, plot_curves
from patchtrace.circuits.graph import CircuitError, EdgeGraph


@pytest.fixture(scope="module")
def setup(smol_tokenizer):
    m = make_tiny("llama", seed=3, tokenizer=smol_tokenizer)
    t = make_task("ioi", n=2, seed=4).tokenize(smol_tokenizer)
    return m, t, prepare(m, t), prepare(m, t, direction="denoise")


def _ref_metric(m, t, base_ids, src_ids, edges):
    src = ref.senders(m.hf, src_ids)
    return float(ref.logit_diff(ref.patched_logits(m.hf, base_ids, src, edges), t.answer, t.wrong).mean())


def test_faithfulness_matches_reference_in_both_conventions(setup):
    m, t, noise, den = setup
    G = noise.graph
    c = discovery.top_n(G, scores(noise, "eap"), 12)
    assert 0 < int(c.sum()) <= 12
    f = faithfulness(c, outside=noise, restore=den)
    clean, corrupt = t.ids("clean", range(2)), t.ids("corrupt", range(2))
    names = lambda mask: [(G.sender_names[s], G.receiver_names[r]) for s, r in mask.nonzero().tolist()]  # noqa: E731
    mc, mx = noise.baselines["clean"], noise.baselines["corrupt"]
    out = _ref_metric(m, t, clean, corrupt, names(G.mask & ~c))
    res = _ref_metric(m, t, corrupt, clean, names(c))
    assert f["outside"][0] == pytest.approx((out - mx) / (mc - mx), abs=1e-4)
    assert f["restore"][0] == pytest.approx((res - mx) / (mc - mx), abs=1e-4)
    full = faithfulness(torch.stack([G.mask, torch.zeros_like(G.mask)]), outside=noise, restore=den)
    assert full["outside"] == pytest.approx([1.0, 0.0], abs=1e-4)
    assert full["restore"] == pytest.approx([1.0, 0.0], abs=1e-4)


def test_pruning_is_exact_under_the_outside_convention(setup):
    _, _, noise, _ = setup
    G = noise.graph
    gen = torch.Generator().manual_seed(0)
    raw = (torch.rand(G.n_senders, G.n_receivers, generator=gen) < 0.15) & G.mask
    pr = discovery.prune(G, raw)
    assert int(pr.sum()) < int(raw.sum())  # something was dead
    assert not bool((pr & ~raw).any())
    m = evaluate_sets(noise, torch.stack([G.mask & ~raw, G.mask & ~pr]))
    assert m[0].item() == pytest.approx(m[1].item(), abs=1e-5)
    # every surviving non-input sender has an incoming circuit edge; every receiver's node reaches out
    for s, r in G.edge_list(pr):
        assert s == 0 or bool(pr[:, G.sender_inputs[s]].any())
        assert r == G.logits_receiver or bool(pr[G.receiver_owner_senders(r)].any())


def test_greedy_grows_from_the_logits_and_budgets_are_checked(setup):
    _, _, noise, _ = setup
    G = noise.graph
    sc = scores(noise, "eap")
    c = discovery.greedy(G, sc, 15, pruned=False)
    assert int(c.sum()) == 15
    # every edge's receiver belongs to the logits or to a node whose output is already in the circuit
    for _, r in G.edge_list(c):
        assert r == G.logits_receiver or bool(c[G.receiver_owner_senders(r)].any())
    assert int(c[:, G.logits_receiver].sum()) >= 1
    partial = sc.clone()
    partial[:, : G.n_receivers // 2] = float("nan")  # edges not scored are never chosen
    picked = discovery.top_n(G, partial, 40, pruned=False)
    assert 0 < int(picked.sum()) <= 40 and torch.isfinite(partial[picked]).all()
    with pytest.raises(CircuitError, match="budget"):
        discovery.top_n(G, sc, G.n_edges + 1)
    with pytest.raises(CircuitError, match="budget"):
        discovery.greedy(G, sc, 0)


def test_acdc_matches_a_plain_sequential_run(setup):
    m, t, noise, _ = setup
    G = noise.graph
    start = discovery.top_n(G, scores(noise, "eap"), 25, pruned=False)
    got, stats = discovery.acdc(noise, 0.05, start=start, window=4)
    # the plain algorithm, one trial at a time, written out here
    tau = 0.05 * abs(noise.baselines["clean"] - noise.baselines["corrupt"])
    c = start.clone()
    cur = float(evaluate_sets(noise, G.mask & ~c)[0])
    for r in sorted(range(G.n_receivers), key=lambda r: (-int(G.receiver_layer[r]), -r)):
        for s in reversed(c[:, r].nonzero().flatten().tolist()):
            if r != G.logits_receiver and not bool(c[G.receiver_owner_senders(r)].any()):
                c[s, r] = False
                continue
            c[s, r] = False
            new = float(evaluate_sets(noise, G.mask & ~c)[0])
            if cur - new < tau:
                cur = new
            else:
                c[s, r] = True
    assert torch.equal(got, c)
    assert 0 < int(got.sum()) < 25 and stats["trials"] > 0
    with pytest.raises(CircuitError, match="noise"):
        discovery.acdc(prepare(m, t, direction="denoise"), 0.1)


def test_circuit_save_load_draw_and_agreement(setup, tmp_path):
    _, _, noise, den = setup
    G = noise.graph
    sc = scores(noise, "eap-ig", steps=2)
    c = Circuit(G, discovery.top_n(G, sc, 10), sc, "eap-ig topn 10", {"outside": 0.5})
    c2 = Circuit.load(c.save(tmp_path / "c"))
    assert torch.equal(c2.edges, c.edges) and torch.equal(torch.nan_to_num(c2.scores), torch.nan_to_num(sc))
    assert c2.edge_names() == c.edge_names() and c2.graph == G and c2.faithfulness == {"outside": 0.5}
    png = c.draw(tmp_path / "c.png")
    assert png.stat().st_size > 5000
    cu = curve("eap-ig", lambda n: discovery.top_n(G, sc, n), [5, 20, G.n_edges], outside=noise, restore=den)
    assert cu.values["outside"][-1] == pytest.approx(1.0, abs=1e-4)
    assert plot_curves([cu], tmp_path / "f.png").stat().st_size > 5000
    a = as_scores(G, sc, method="eap-ig", direction="noise", value_name="attribution")
    assert agreement(a, a)["pearson"] == pytest.approx(1.0)
    with pytest.raises(CircuitError, match="different graphs"):
        agreement(a, as_scores(EdgeGraph(1, 1, 1), torch.zeros(3, 5), method="x", direction="noise"))
    with pytest.raises(CircuitError, match="not a circuit folder"):
        Circuit.load(tmp_path / "nothing")


def test_cli_circuit_and_compare_edges(tmp_path, smol_tokenizer):
    from patchtrace.cli import build_app

    d = tmp_path / "tiny"
    make_tiny("llama", seed=3, tokenizer=smol_tokenizer).hf.save_pretrained(d, safe_serialization=True)
    smol_tokenizer.save_pretrained(d)
    app = build_app()
    r = CliRunner().invoke(app, ["circuit", "--model", str(d), "--n", "2", "--method", "eap-ig", "--steps", "2",
                                 "--edges", "12", "--curve", "5,20", "--out", str(tmp_path / "c"), "-q"])
    assert r.exit_code == 0, r.output
    assert "faithfulness (outside)" in r.output
    c = Circuit.load(tmp_path / "c" / "circuit")
    assert 0 < c.n_edges <= 12 and (tmp_path / "c" / "faithfulness.png").is_file()
    r = CliRunner().invoke(app, ["report", str(tmp_path / "c")])  # the edge grid's page shows the circuit graph
    assert r.exit_code == 0, r.output
    assert "circuit graph" in (tmp_path / "c" / "report.html").read_text()
    r = CliRunner().invoke(app, ["compare", "--sites", "edges", "--methods", "eap", "--model", str(d), "--n", "2",
                                 "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 0, r.output
    assert "Pearson" in r.output and (tmp_path / "cmp" / "exact" / "scores.json").is_file()
    r = CliRunner().invoke(app, ["circuit", "--model", str(d), "--edges", "10000000", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "budget" in r.output
