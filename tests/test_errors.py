"""Bad input raises patchtrace's own exceptions, with messages naming the offending item."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from patchtrace import (
    Example,
    ModelLoadError,
    SiteError,
    SiteSpec,
    Task,
    TaskError,
    UnsupportedModelError,
    load_model,
    make_task,
    parse_site,
    wrap_model,
)
from patchtrace.engine.sweep import EngineError, resolve
from patchtrace.methods.activation_patching import PatchingConfig, run
from patchtrace.metrics import Metric, MetricError
from patchtrace.results import ResultsError, Scores
from patchtrace.sites import Site
from patchtrace.tasks.io import load_task


def test_length_mismatch_names_example_and_tokens(smol_tokenizer):
    t = Task("t", [Example("The cat sat", "The dog sat", " on", " in"),
                   Example("When Mary went", "When Mary Ann went", " home", " out")])
    with pytest.raises(TaskError) as e:
        t.tokenize(smol_tokenizer)
    msg = str(e.value)
    assert "example 1" in msg
    assert "Ann" in msg and "Mary" in msg  # shows the tokens of both prompts
    assert not isinstance(e.value, RuntimeError)


def test_multi_token_answer_names_example_and_tokens(smol_tokenizer):
    t = Task("t", [Example("The cat sat", "The dog sat", " on", " in"),
                   Example("The cat sat", "The dog sat", " antidisestablishmentarianism", " in")])
    with pytest.raises(TaskError) as e:
        t.tokenize(smol_tokenizer)
    msg = str(e.value)
    assert "example 1" in msg and "antidisestablishmentarianism" in msg
    assert "first_token" in msg  # says how to opt in
    # the explicit opt-in works
    tt = t.tokenize(smol_tokenizer, first_token=True)
    assert tt.answer.shape == (2, 1)


def test_empty_task(smol_tokenizer):
    with pytest.raises(TaskError, match="no examples"):
        Task("empty", []).tokenize(smol_tokenizer)


def test_unknown_task_name_lists_builtins():
    with pytest.raises(TaskError) as e:
        make_task("no_such_task")
    assert "no_such_task" in str(e.value) and "ioi" in str(e.value)


def test_unknown_model_offline_fast(tmp_path):
    """No network: HF_HUB_OFFLINE=1 → ModelLoadError quickly (run in a subprocess so the env applies)."""
    code = (
        "import time, patchtrace\n"
        "t = time.time()\n"
        "try:\n"
        "    patchtrace.load_model('no-such-org/no-such-model')\n"
        "except patchtrace.ModelLoadError as e:\n"
        "    print('OK', round(time.time() - t, 2), str(e).replace(chr(10), ' '))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("OK"), out.stdout + out.stderr
    assert "no-such-org/no-such-model" in out.stdout
    assert "HF_HUB_OFFLINE" in out.stdout
    assert time.time() - t0 < 60


def test_local_dir_without_config(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture_wrap_and_load(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM  # (BERT was the example here until it became a family)

    cfg = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                    max_position_embeddings=32, word_embed_proj_dim=16)
    with pytest.raises(UnsupportedModelError) as e:
        wrap_model(OPTForCausalLM(cfg))
    msg = str(e.value)
    assert "'opt'" in msg and "llama" in msg and "gpt2" in msg
    cfg.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="opt"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("text", ["resid_pre[5", "foo[1]", "head[2].n3", "neuron[1].h2", "head[-1]", "", "embed[3]",
                                  "attn_out[1].h2", "resid_pre"])
def test_bad_site_strings(text):
    with pytest.raises(SiteError) as e:
        parse_site(text)
    if text:
        assert repr(text) in str(e.value) or text.split("[")[0] in str(e.value)


def test_unknown_site_kind_value_and_spec():
    with pytest.raises(SiteError, match="'mlp_in'"):
        Site("mlp_in", 1)
    with pytest.raises(SiteError, match="'nope'"):
        SiteSpec("nope")
    with pytest.raises(SiteError, match="per unit"):
        SiteSpec("resid_pre", per_unit=True)
    with pytest.raises(SiteError, match="'bogus'"):
        SiteSpec.parse("head:bogus")


@pytest.fixture(scope="module")
def llama(smol_tokenizer):
    from conftest import make_tiny

    return make_tiny("llama", tokenizer=smol_tokenizer)


@pytest.mark.parametrize(
    ("site", "what"),
    [
        (Site("head", 7, 0, -1), "layer 7"),
        (Site("head", 1, 4, -1), "unit 4"),
        (Site("k", 1, 2, -1), "unit 2"),  # 2 KV heads
        (Site("neuron", 0, 96, 0), "unit 96"),
        (Site("resid_pre", 0, None, 50), "position 50"),
        (Site("resid_pre", 0, None, -51), "position -51"),
    ],
)
def test_out_of_range_sites(llama, site, what):
    with pytest.raises(EngineError) as e:
        resolve(site, llama, 50)
    assert str(site) in str(e.value) and what in str(e.value)


def test_out_of_range_layer_in_a_sweep(llama):
    with pytest.raises(EngineError, match=r"head\[9\]"):
        run(llama, make_task("ioi", n=2), SiteSpec("head", per_unit=True, layers=(9,)))


def test_resid_mid_on_parallel_blocks(smol_tokenizer):
    from conftest import make_tiny

    neox = make_tiny("gpt_neox", tokenizer=smol_tokenizer)
    with pytest.raises(EngineError, match="parallel"):
        resolve(Site("resid_mid", 0, None, -1), neox, 5)


def test_positions_all_needs_equal_lengths(llama):
    t = Task("t", [Example("The cat sat", "The dog sat", " on", " in"),
                   Example("When Mary went home", "When John went home", " to", " at")])
    with pytest.raises(EngineError, match="one length"):
        run(llama, t, SiteSpec("resid_pre", positions="all"))


def test_unknown_metric(llama):
    with pytest.raises(MetricError, match="'accuracy'"):
        Metric("accuracy")
    with pytest.raises(MetricError, match="'accuracy'"):
        run(llama, make_task("ioi", n=2), SiteSpec("resid_pre"), PatchingConfig(metric="accuracy"))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"clean": "a b", "corrupt": "a c", "answer": " x", "wrong": " y"}\n\n{"clean": "a b", oops}\n')
    with pytest.raises(TaskError) as e:
        load_task(p)
    assert f"{p}:3" in str(e.value)
    p2 = tmp_path / "missing.jsonl"
    p2.write_text('{"clean": "a b", "corrupt": "a c", "answer": " x"}\n')
    with pytest.raises(TaskError, match=r"missing\.jsonl:1: missing field\(s\) wrong"):
        load_task(p2)
    p3 = tmp_path / "list.jsonl"
    p3.write_text('["a", "b"]\n')
    with pytest.raises(TaskError, match=r"list\.jsonl:1"):
        load_task(p3)
    with pytest.raises(TaskError, match="does not exist"):
        load_task(tmp_path / "nope.jsonl")


def test_malformed_csv_names_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("clean,corrupt,answer,wrong\na b,a c, x, y\na b,a c,,y\n")
    with pytest.raises(TaskError, match=r"bad\.csv:3: missing field\(s\) answer"):
        load_task(p)


def test_results_folder_missing_files(tmp_path):
    s = Scores(torch.zeros(2, 3), ("layer", "head"), "head")
    d = s.save(tmp_path / "r")
    (d / "scores.safetensors").unlink()
    with pytest.raises(ResultsError, match=r"scores\.safetensors"):
        Scores.load(d)
    with pytest.raises(ResultsError):
        Scores.load(tmp_path / "does-not-exist")


def test_results_bad_version_and_axes(tmp_path):
    import json

    d = Scores(torch.zeros(2), ("layer",), "resid_pre").save(tmp_path / "r")
    meta = json.loads((d / "scores.json").read_text())
    meta["format_version"] = 99
    (d / "scores.json").write_text(json.dumps(meta))
    with pytest.raises(ResultsError, match="99"):
        Scores.load(d)
    with pytest.raises(ResultsError, match="'row'"):
        Scores(torch.zeros(2), ("row",), "resid_pre")
    with pytest.raises(ResultsError, match="dims"):
        Scores(torch.zeros(2, 2), ("layer",), "resid_pre")


def test_every_library_error_derives_from_patchtrace_error():
    """One ``except patchtrace.PatchtraceError`` catches every error class the library defines."""
    import importlib
    import pkgutil

    import patchtrace
    from patchtrace import PatchtraceError

    found = []
    for mod in pkgutil.walk_packages(patchtrace.__path__, "patchtrace."):
        m = importlib.import_module(mod.name)
        for name, obj in vars(m).items():
            if isinstance(obj, type) and issubclass(obj, Exception) and name.endswith("Error") and obj.__module__ == m.__name__:
                found.append(obj)
    assert len(found) >= 12  # non-vacuous: the walk found the library's error classes
    assert all(issubclass(e, PatchtraceError) for e in found), [e.__name__ for e in found if not issubclass(e, PatchtraceError)]
