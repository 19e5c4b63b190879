"""Encoders (BERT, RoBERTa; tiny random masked LMs): the runner equals the HF forward, and patching
through the engine equals an independent naive reference at the mask position, including patches at
positions *after* the mask (bidirectional attention: a causal suffix shortcut would get them wrong).

The reference lives in this file and uses only the HF modules, one full ``hf(ids).logits`` forward
per patch, with torch hooks registered for one call:

============  ==================================================================================
embed         output of ``<base>.embeddings`` (after its LayerNorm)
resid_pre     input of ``encoder.layer[L]``
resid_mid     output of ``layer.attention.output`` (``LN(dense(z) + resid_pre)``, what the MLP reads)
resid_post    output of ``encoder.layer[L]``
attn_out      output of ``layer.attention.output.dense`` (before the add and the LayerNorm)
head          input of ``layer.attention.output.dense``, split ``[H, d]``
mlp_out       output of ``layer.output.dense`` (before the add and the LayerNorm)
neuron        input of ``layer.output.dense``
============  ==================================================================================
"""

from __future__ import annotations

import pytest
import torch

from patchtrace import PatchingConfig, SiteSpec
from patchtrace.engine.patch import EngineError
from patchtrace.engine.sweep import Patch, Scorer, collect, plan_sweep, resolve, run_patches
from patchtrace.methods.activation_patching import run as patch_run
from patchtrace.metrics import Metric
from patchtrace.models.adapters import UnsupportedModelError
from patchtrace.models.load import wrap_model
from patchtrace.models.runner import RunnerError
from patchtrace.sites import Site
from patchtrace.tasks.base import Example, Task, TaskError
from tiny_encoder import FAMILIES, WORDS, encoder_config, tiny_encoder


def _config(family: str, **over):
    return encoder_config(family, **{"type_vocab_size": 2, **over})


def _hf(family: str, seed: int = 0, **over):
    return tiny_encoder(family, seed, **{"type_vocab_size": 2, **over})


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


@pytest.fixture(scope="module", params=FAMILIES)
def enc(request, tokenizer):
    return wrap_model(_hf(request.param), tokenizer, name=f"tiny-{request.param}")


# -- the naive reference ------------------------------------------------------------------------


def _base(hf):
    return hf.bert if hf.config.model_type == "bert" else hf.roberta


def _where(hf, kind: str, layer: int | None):
    """(module, 'in'|'out') holding the site, per the table in the module docstring."""
    if kind == "embed":
        return _base(hf).embeddings, "out"
    blk = _base(hf).encoder.layer[layer]
    return {"resid_pre": (blk, "in"), "resid_post": (blk, "out"), "resid_mid": (blk.attention.output, "out"),
            "attn_out": (blk.attention.output.dense, "out"), "head": (blk.attention.output.dense, "in"),
            "mlp_out": (blk.output.dense, "out"), "neuron": (blk.output.dense, "in")}[kind]


def _assign(dst: torch.Tensor, src: torch.Tensor, site: Site, heads: int) -> torch.Tensor:
    dst, src = dst.clone(), src.to(dst.dtype)
    p = slice(None) if site.pos is None else site.pos
    if site.kind == "head":
        d, s = dst.unflatten(-1, (heads, -1)), src.unflatten(-1, (heads, -1))
        u = slice(None) if site.unit is None else site.unit
        d[:, p, u] = s[:, p, u]
        return d.flatten(-2)
    if site.unit is None:
        dst[:, p] = src[:, p]
    else:
        dst[:, p, site.unit] = src[:, p, site.unit]
    return dst


def _ref_logits(hf, ids, *, record=(), patch=None):
    """HF forward logits ``[B, T, V]``; records the sites in ``record``; ``patch`` = (site, source
    value) replaces the site's value at its position/unit."""
    rec: dict = {}
    handles = []
    heads = hf.config.num_attention_heads
    todo = {(s.kind, s.layer) for s in record} | ({(patch[0].kind, patch[0].layer)} if patch else set())
    for kind, layer in todo:
        mod, side = _where(hf, kind, layer)

        def pre(m, args, kind=kind, layer=layer):
            rec[(kind, layer)] = args[0].detach().clone()
            if patch and (patch[0].kind, patch[0].layer) == (kind, layer):
                return (_assign(args[0], patch[1], patch[0], heads), *args[1:])
            return None

        def post(m, args, out, kind=kind, layer=layer):
            rec[(kind, layer)] = out.detach().clone()
            if patch and (patch[0].kind, patch[0].layer) == (kind, layer):
                return _assign(out, patch[1], patch[0], heads)
            return None

        handles.append(mod.register_forward_pre_hook(pre) if side == "in" else mod.register_forward_hook(post))
    try:
        with torch.no_grad():
            logits = hf(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, rec


def _ref_effects(hf, clean, corrupt, mask_pos, sites, ans, wrong):
    """Denoising effects ``[S, N]`` of each site (logit diff at the mask position), naively."""
    rows = torch.arange(clean.shape[0])
    keys = [Site(s.kind, s.layer) for s in sites]
    _, src = _ref_logits(hf, clean, record=keys)
    base, _ = _ref_logits(hf, corrupt)

    def ld(lg):
        at = lg[rows, mask_pos]
        return at[rows, ans] - at[rows, wrong]

    out = []
    for s in sites:
        lg, _ = _ref_logits(hf, corrupt, patch=(s, src[(s.kind, s.layer)]))
        out.append(ld(lg) - ld(base))
    return torch.stack(out)


# -- the tests ------------------------------------------------------------------------------------


def _ids(seed: int, n: int, T: int, mask_pos: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(WORDS), (n, T), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    ids[torch.arange(n), torch.tensor(mask_pos)] = 4
    return ids


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("over", [{}, {"chunk_size_feed_forward": 1}, {"hidden_act": "gelu_new"}])
def test_runner_equals_hf_forward(family, over):
    hf = _hf(family, **over)
    m = wrap_model(hf, None, name="t")
    ids = _ids(1, 3, 11, [4, 2, 7])
    ids[1, 5] = 1  # RoBERTa's padding id: its position rule numbers around it
    with torch.no_grad():
        ref = hf(ids).logits
        got = m.runner.forward(ids).logits
        ro = torch.tensor([4, 2, 7])
        at = m.runner.forward(ids, last_only=True, readout=ro).logits
        cols = torch.tensor([6, 11, 12])
        some = m.runner.forward(ids, last_only=True, readout=ro, unembed_cols=cols).logits
    assert (got - ref).abs().max() <= 1e-5
    assert (at[:, 0] - ref[torch.arange(3), ro]).abs().max() <= 1e-5
    assert (some[:, 0] - ref[torch.arange(3), ro][:, cols]).abs().max() <= 1e-5
    assert ref.abs().max() > 1.0  # not a degenerate model


SITES = [
    ("resid_pre", None), ("resid_mid", None), ("resid_post", None), ("attn_out", None), ("mlp_out", None),
    ("head", 1), ("head", 3), ("neuron", 5), ("embed", None),
]


@pytest.mark.parametrize("fast", [True, False])
def test_sweep_equals_naive_reference_at_every_position(enc, fast):
    """Every kind at every position (before, at and after the mask) against the naive reference."""
    N, T, mask_pos = 2, 8, [3, 2]
    clean, corrupt = _ids(2, N, T, mask_pos), _ids(3, N, T, mask_pos)
    ans, wrong = torch.tensor([11, 12]), torch.tensor([12, 8])
    sites = [Site(k, None if k == "embed" else L, u, p) for k, u in SITES for L in ((None,) if k == "embed" else
             (0, 2)) for p in range(T)]
    pos = torch.tensor(mask_pos)
    need = {s.point for s in sites}
    src = collect(enc, clean, need, readout=pos)
    base = collect(enc, corrupt, need, readout=pos)
    scorer = Scorer(Metric("logit_diff"), ans[:, None], wrong[:, None], pos=pos)
    patches = [Patch((resolve(s, enc, T),)) for s in sites]
    got = run_patches(enc, corrupt, base, src, patches, scorer, fast=fast, skip_noops=False)
    base_m = scorer(base.logits, 1, False)[0]
    ref = _ref_effects(enc.hf, clean, corrupt, pos, sites, ans, wrong)
    assert (got - base_m - ref).abs().max() <= 1e-5
    after = torch.tensor([s.pos > max(mask_pos) for s in sites])
    # bidirectional attention: patches after the mask move the metric (a causal shortcut reads them as 0)
    assert ref[after].abs().max() > 1e-2
    assert (got - base_m)[after].abs().max() > 1e-2


def test_activation_patching_reads_the_mask_position(enc, tokenizer):
    """The method end to end: the task's [MASK] is the readout (not the last position), and the
    plan says there is no suffix shortcut."""
    task = Task("capital", [
        Example("the capital of france is [MASK] and rome is in italy .",
                "the capital of italy is [MASK] and rome is in france .", "paris", "rome"),
        Example("[MASK] is the capital of france and rome is in italy .",
                "[MASK] is the capital of italy and rome is in france .", "paris", "rome"),
    ])
    tok = task.tokenize(tokenizer)
    mask = tok.readout(range(len(tok)), mask=True)
    assert mask is not None and mask.tolist() == [6, 1]  # [CLS] counts: neither is the last position
    spec = SiteSpec("resid_pre", positions="all", layers=(1,))
    s = patch_run(enc, tok, spec, PatchingConfig(sanity_check=False))
    clean = torch.stack([torch.tensor(c) for c in tok.clean])
    corrupt = torch.stack([torch.tensor(c) for c in tok.corrupt])
    T = clean.shape[1]
    sites = [Site("resid_pre", 1, None, p) for p in range(T)]
    ref = _ref_effects(enc.hf, clean, corrupt, mask, sites, tok.answer[:, 0], tok.wrong[:, 0]).T  # [N, T]
    assert s.per_example is not None
    assert (s.per_example.reshape(len(tok), T) - ref).abs().max() <= 1e-5
    assert "bidirectional" in s.provenance["plan"][0]


def test_unsupported_options_are_refused_by_name():
    from transformers import BertForMaskedLM, BertModel

    for over, name in (({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
                       ({"is_decoder": True}, "is_decoder=True"),
                       ({"is_decoder": True, "add_cross_attention": True}, "is_decoder=True")):
        torch.manual_seed(0)
        with pytest.raises(UnsupportedModelError, match=name):
            wrap_model(BertForMaskedLM(_config("bert", **over)), None)
    hf = BertForMaskedLM(_config("bert"))
    hf.config.add_cross_attention = True  # transformers builds it only for a decoder; a config may still say so
    with pytest.raises(UnsupportedModelError, match="add_cross_attention=True"):
        wrap_model(hf, None)
    with pytest.raises(UnsupportedModelError, match="BertForMaskedLM"):
        wrap_model(BertModel(_config("bert")), None)


def test_bad_prompts_and_calls_are_refused(enc, tokenizer):
    ok = "the capital of france is [MASK] ."
    for clean, corrupt, what in (
        ("the capital of france is paris .", "the capital of italy is paris .", "example 1: the clean prompt has no"),
        ("the [MASK] of france is [MASK] .", "the [MASK] of italy is [MASK] .", "example 1: the clean prompt has 2"),
        ("the capital of france is [MASK] .", "the capital of italy [MASK] rome .", "example 1: the mask token is at"),
    ):
        task = Task("t", [Example(ok, ok.replace("france", "italy"), "paris", "rome"),
                          Example(clean, corrupt, "paris", "rome")])
        tok = task.tokenize(tokenizer)
        with pytest.raises(TaskError, match=what):
            patch_run(enc, tok, SiteSpec("resid_pre", positions="all"))
    ids = _ids(4, 2, 6, [2, 2])
    with pytest.raises(RunnerError, match="both directions"):
        enc.runner.forward(ids, last_only=True)  # no readout: there is no "last position" to read
    kv = collect(enc, ids, readout=torch.tensor([2, 2])).kv
    with pytest.raises(RunnerError, match="cannot resume after cached"):
        enc.runner.forward(ids[:, 3:], pos_offset=3, past_kv=kv)
    with pytest.raises(EngineError, match="from position 0"):
        pos = torch.tensor([2, 2])
        base = collect(enc, ids, {Site("resid_pre", 1, None, 4).point}, from_pos=3, readout=pos)
        run_patches(enc, ids, base, base, [Patch((Site("resid_pre", 1, None, 4),))],
                    Scorer(Metric("logit_diff"), torch.tensor([[11], [11]]), torch.tensor([[12], [12]]), pos=pos))


def test_plan_turns_the_suffix_shortcut_off(enc):
    """Causal models plan suffix-only work for late positions; an encoder computes every position."""
    T = 8
    patches = [Patch((Site("resid_pre", 1, None, p),)) for p in range(T)]
    plan = plan_sweep(enc, patches, 2, T)
    assert "bidirectional" in plan.mode
    # every patch resumes at layer 1 of 3 over all T positions: 2/3 of a forward each
    assert plan.forward_equivalents == pytest.approx(T * 2 / 3)


def test_cli_patches_a_bert_folder_at_the_mask(tmp_path, tokenizer):
    """``patchtrace patch --model DIR`` loads the folder as a masked LM and reads the mask position;
    a task without a mask is a one-line error naming the example."""
    import json

    from typer.testing import CliRunner

    from patchtrace.cli import build_app
    from patchtrace.results import Scores

    hf = _hf("bert")
    hf.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    rows = [{"clean": "the capital of france is [MASK] .", "corrupt": "the capital of italy is [MASK] .",
             "answer": "paris", "wrong": "rome"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "nomask.jsonl").write_text(json.dumps({**rows[0], "clean": "the capital of france is paris .",
                                                        "corrupt": "the capital of italy is paris ."}) + "\n")
    app, run = build_app(), CliRunner()
    args = ["patch", "--model", str(tmp_path / "bert"), "--sites", "resid_pre", "--positions", "all", "--layers", "1"]
    res = run.invoke(app, [*args, "--task", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    s = Scores.load(tmp_path / "out")  # one site kind: saved in the folder itself
    clean = torch.tensor([tokenizer(rows[0]["clean"]).input_ids])
    corrupt = torch.tensor([tokenizer(rows[0]["corrupt"]).input_ids])
    T = clean.shape[1]
    ref = _ref_effects(hf, clean, corrupt, torch.tensor([6]), [Site("resid_pre", 1, None, p) for p in range(T)],
                       torch.tensor([11]), torch.tensor([12]))[:, 0]
    assert (s.values.reshape(T) - ref).abs().max() <= 1e-5 and ref.abs().max() > 1e-3
    bad = run.invoke(app, [*args, "--task", str(tmp_path / "nomask.jsonl"), "--out", str(tmp_path / "out2")])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "example 0: the clean prompt has no mask token '[MASK]'" in bad.output
