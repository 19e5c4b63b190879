"""The command line, end to end on a tiny Llama saved to disk (safetensors + the SmolLM2 tokenizer).

Values saved by ``patchtrace patch`` are checked against :func:`activation_patching.run` called
directly on an independently loaded copy of the model, so the CLI plumbing (option parsing, folder
layout, save/load) cannot hide a wrong number. Error cases check exit code 2, a message naming the
bad item, and no traceback.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny
from patchtrace import PatchingConfig, SiteSpec, activation_patching, load_model, make_task
from patchtrace.cli import build_app, command_modules, common
from patchtrace.results import Scores
from patchtrace.sites import SiteError

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny("llama", seed=5, tokenizer=smol_tokenizer)
    model.hf.save_pretrained(d, safe_serialization=True)
    smol_tokenizer.save_pretrained(d)
    assert (d / "model.safetensors").is_file()
    return d


@pytest.fixture(scope="module")
def app():
    return build_app()


def invoke(app, *args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, *needles: str) -> None:
    out = result.output
    assert result.exit_code == 2, out
    assert "Traceback" not in out, out
    assert "error:" in out, out
    for n in needles:
        assert n in out, f"{n!r} not in {out!r}"


# -- discovery -------------------------------------------------------------------------------------


def test_my_commands_are_discovered(app):
    mods = command_modules()
    for m in ("patch", "show", "report", "demo", "info"):
        assert m in mods
    assert "common" not in mods
    res = invoke(app, "--help")
    assert res.exit_code == 0
    for cmd in ("patch", "show", "report", "demo", "models", "tasks"):
        assert cmd in res.output


def test_new_module_with_register_is_discovered(tmp_path, monkeypatch):
    """A file dropped into the package with a register(app) function becomes a command."""
    import patchtrace.cli as cli_pkg

    (tmp_path / "zz_hello.py").write_text(
        textwrap.dedent(
            """
            import typer
            from patchtrace.sites import SiteError

            def register(app: typer.Typer) -> None:
                @app.command("hello")
                def hello(fail: bool = False) -> None:
                    if fail:
                        raise SiteError("bad site 'zz[1]'")
                    print("hello from zz")
            """
        )
    )
    monkeypatch.setattr(cli_pkg, "__path__", [*cli_pkg.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "patchtrace.cli.zz_hello", raising=False)
    app = build_app(strict=True)
    ok = invoke(app, "hello")
    assert ok.exit_code == 0 and "hello from zz" in ok.output
    # library errors raised by someone else's command are caught at the boundary too
    assert_clean_error(invoke(app, "hello", "--fail"), "zz[1]", "SiteError")
    sys.modules.pop("patchtrace.cli.zz_hello", None)


# -- patch / show / report -------------------------------------------------------------------------


def test_patch_matches_library_then_show_and_report(app, tiny_dir, tmp_path):
    out = tmp_path / "run"
    res = invoke(app, "patch", "--model", tiny_dir, "--task", "ioi", "--n", "4", "--seed", "1", "--sites", "head",
                 "--positions", "last", "--out", out, "--top", "5", "-q")
    assert res.exit_code == 0, res.output
    assert (out / "scores.json").is_file() and (out / "scores.safetensors").is_file()
    assert not (out / ".partial").exists()  # checkpoint blocks cleaned up after the final save
    saved = Scores.load(out)

    # independent: load the model again and call the library directly
    model = load_model(str(tiny_dir))
    ref = activation_patching(model, make_task("ioi", n=4, seed=1), SiteSpec("head", per_unit=True, positions="last"),
                              PatchingConfig(direction="denoise", metric="logit_diff"))
    assert saved.values.abs().max() > 1e-4  # non-vacuity: patching heads moved the metric
    assert abs(ref.baselines["clean"] - ref.baselines["corrupt"]) > 1e-4
    torch.testing.assert_close(saved.values, ref.values, atol=1e-5, rtol=1e-5)
    assert saved.axes == ("layer", "head") and saved.shape == (3, 4)
    assert saved.baselines["clean"] == pytest.approx(ref.baselines["clean"], abs=1e-5)
    assert saved.baselines["corrupt"] == pytest.approx(ref.baselines["corrupt"], abs=1e-5)

    # the printed table starts with the best site of the direct run
    flat = ref.values.flatten()
    li, hi = divmod(int(flat.argmax()), ref.shape[1])
    best = f"head[{li}].h{hi}@-1"
    assert best in res.output
    assert f"{ref.baselines['clean']:+.4f}" in res.output

    shown = invoke(app, "show", out, "--top", "3")
    assert shown.exit_code == 0, shown.output
    assert best in shown.output
    assert "activation_patching" in shown.output  # provenance summary
    assert f"{ref.baselines['corrupt']:+.4f}" in shown.output

    rep = invoke(app, "report", out)
    assert rep.exit_code == 0, rep.output
    png, html = out / "heatmap.png", out / "report.html"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = html.read_text()
    assert best in doc and str(png) in rep.output and str(html) in rep.output


def test_patch_several_kinds_all_positions(app, tiny_dir, tmp_path):
    out = tmp_path / "multi"
    res = invoke(app, "patch", "--model", tiny_dir, "--n", "2", "--sites", "head,resid_pre", "--positions", "all",
                 "--layers", "1-2", "--out", out, "-q")
    assert res.exit_code == 0, res.output
    head, resid = Scores.load(out / "head"), Scores.load(out / "resid_pre")
    assert head.axes == ("layer", "head", "pos") and resid.axes == ("layer", "pos")
    assert resid.labels["layer_index"] == ["1", "2"]
    model = load_model(str(tiny_dir))
    tok = make_task("ioi", n=2, seed=0).tokenize(model.tokenizer)
    ref = activation_patching(model, tok, SiteSpec("resid_pre", positions="all", layers=(1, 2)))
    assert resid.values.abs().max() > 1e-4
    torch.testing.assert_close(resid.values, ref.values, atol=1e-5, rtol=1e-5)
    assert resid.labels["pos"] == tok.tokens[0]
    rep = invoke(app, "report", out)
    assert rep.exit_code == 0, rep.output
    assert (out / "head" / "heatmap.png").is_file() and (out / "resid_pre" / "heatmap.png").is_file()
    assert (out / "report.html").is_file()


def test_dry_run_computes_nothing(app, tiny_dir, tmp_path, monkeypatch):
    from patchtrace.models.runner import Runner

    def boom(*a, **k):
        raise AssertionError("dry run must not run the model")

    monkeypatch.setattr(Runner, "forward", boom)
    out = tmp_path / "dry"
    res = invoke(app, "patch", "--model", tiny_dir, "--n", "3", "--sites", "head,mlp_out", "--out", out, "--dry-run")
    assert res.exit_code == 0, res.output
    assert "dry run: nothing computed" in res.output
    assert "head: 12 cells" in res.output and "mlp_out: 3 cells" in res.output
    assert "mode=fast" in res.output and "patches=12" in res.output
    assert not out.exists()


# -- errors ------------------------------------------------------------------------------------------


def test_bad_sites_exit_2(app, tiny_dir, tmp_path):
    res = invoke(app, "patch", "--model", tiny_dir, "--sites", "head,hed", "--out", tmp_path / "x")
    assert_clean_error(res, "'hed'")
    assert not (tmp_path / "x").exists()


def test_unknown_task_exit_2(app, tiny_dir, tmp_path):
    res = invoke(app, "patch", "--model", tiny_dir, "--task", "nosuchtask", "--out", tmp_path / "x")
    assert_clean_error(res, "nosuchtask", "ioi")


def test_missing_task_file_exit_2(app, tiny_dir, tmp_path):
    res = invoke(app, "patch", "--model", tiny_dir, "--task", str(tmp_path / "nope.jsonl"), "--out", tmp_path / "x")
    assert_clean_error(res, "nope.jsonl")


def test_task_file(app, tiny_dir, tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(
        json.dumps({"clean": "When Mary and John went to the park, John gave a book to", "corrupt":
                    "When Mary and John went to the park, Mary gave a book to", "answer": " Mary", "wrong": " John"})
        + "\n"
    )
    res = invoke(app, "patch", "--model", tiny_dir, "--task", f, "--sites", "attn_out", "--out", tmp_path / "o", "-q")
    assert res.exit_code == 0, res.output
    s = Scores.load(tmp_path / "o")
    assert s.provenance["task"]["name"] == "t" and s.axes == ("layer",)


def test_unknown_model_path_exit_2(app, tmp_path):
    missing = tmp_path / "no-such-model"
    res = invoke(app, "patch", "--model", missing, "--out", tmp_path / "x")
    assert_clean_error(res, "no-such-model", "ModelLoadError")


def test_unsupported_architecture_exit_2(app, tmp_path):
    d = tmp_path / "opt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "opt", "architectures": ["OPTForCausalLM"]}))
    res = invoke(app, "patch", "--model", d, "--out", tmp_path / "x")
    assert_clean_error(res, "'opt'", "UnsupportedModelError")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--positions", "lastish"), "lastish"),
        (("--metric", "acc"), "'acc'"),
        (("--direction", "sideways"), "sideways"),
        (("--max-memory", "4 parsecs"), "4 parsecs"),
        (("--layers", "5-2"), "5-2"),
    ],
)
def test_bad_options_exit_2_before_loading(app, tmp_path, args, needle):
    # the model path does not exist: the option error must come first (nothing is loaded)
    res = invoke(app, "patch", "--model", tmp_path / "never-loaded", *args)
    assert_clean_error(res, needle)
    assert "never-loaded" not in res.output


def test_show_without_results_exit_2(app, tmp_path):
    assert_clean_error(invoke(app, "show", tmp_path), "no patchtrace results")


def test_show_corrupt_results_exit_2(app, tmp_path):
    (tmp_path / "scores.json").write_text(json.dumps({"format_version": 99}))
    (tmp_path / "scores.safetensors").write_bytes(b"")
    assert_clean_error(invoke(app, "show", tmp_path), "format version 99")


def test_models_and_tasks(app):
    m = invoke(app, "models")
    assert m.exit_code == 0 and "llama" in m.output and "smollm2-135m" in m.output
    t = invoke(app, "tasks")
    assert t.exit_code == 0
    for name in ("ioi", "factual", "greater_than"):
        assert name in t.output


# -- option parsers ----------------------------------------------------------------------------------


def test_parse_positions():
    assert common.parse_positions("last") == "last"
    assert common.parse_positions("ALL") == "all"
    assert common.parse_positions("none") is None
    assert common.parse_positions("0, 3,-1") == [0, 3, -1]
    with pytest.raises(common.CLIError, match="'x1'"):
        common.parse_positions("x1")


def test_parse_memory():
    assert common.parse_memory("4GB") == 4 * 10**9
    assert common.parse_memory("512MiB") == 512 * 2**20
    assert common.parse_memory("1.5 gib") == int(1.5 * 2**30)
    assert common.parse_memory("1e9") == 10**9
    assert common.parse_memory(None) is None
    for bad in ("4 XB", "GB", "-1GB", "0"):
        with pytest.raises(common.CLIError):
            common.parse_memory(bad)


def test_parse_layers_and_sites():
    assert common.parse_layers("0-3,7,2") == (0, 1, 2, 3, 7)
    assert common.parse_layers(None) is None
    specs = common.parse_sites("head, resid_pre,head:layer".replace("head:layer", "attn_out"), [0, -1], (1,))
    assert [(s.kind, s.per_unit, s.positions, s.layers) for s in specs] == [
        ("head", True, [0, -1], (1,)), ("resid_pre", False, [0, -1], (1,)), ("attn_out", False, [0, -1], (1,))]
    assert common.parse_sites("head:layer")[0].per_unit is False
    with pytest.raises(SiteError, match="given twice"):
        common.parse_sites("head,head")
    with pytest.raises(SiteError, match="'nope'"):
        common.parse_sites("nope")


# -- output folders: another run's results are never silently replaced or left stale -----------------


def test_other_task_into_finished_out_is_refused_then_overwritten(app, tiny_dir, tmp_path):
    out = tmp_path / "o"
    base = ["patch", "--model", tiny_dir, "--task", "ioi", "--n", "2", "--sites", "resid_pre", "--layers", "0",
            "--out", out, "-q"]
    assert invoke(app, *base).exit_code == 0
    r = invoke(app, *[*base[:5], "--seed", "7", *base[5:]])
    assert_clean_error(r, "different run", "--overwrite")
    r = invoke(app, *[*base[:5], "--seed", "7", *base[5:], "--overwrite"])
    assert r.exit_code == 0, r.output
    assert Scores.load(out).provenance["task"]["params"]["seed"] == 7


def test_stale_per_kind_results_are_refused_then_cleared(app, tiny_dir, tmp_path):
    out = tmp_path / "o"
    base = ["patch", "--model", tiny_dir, "--task", "ioi", "--n", "2", "--layers", "0", "--out", out, "-q"]
    assert invoke(app, *base, "--sites", "head,resid_pre").exit_code == 0
    assert (out / "head" / "scores.json").is_file() and (out / "resid_pre" / "scores.json").is_file()
    r = invoke(app, *base, "--sites", "mlp_out")
    assert_clean_error(r, "would not replace", "resid_pre")
    r = invoke(app, *base, "--sites", "mlp_out", "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (out / "head" / "scores.json").exists() and not (out / "resid_pre" / "scores.json").exists()
    assert Scores.load(out).site_kind == "mlp_out"
    r = invoke(app, "show", out)
    assert r.exit_code == 0 and "mlp_out" in r.output and "resid_pre" not in r.output


def test_sub_grid_cli_names_the_patched_layer(app, tiny_dir, tmp_path):
    r = invoke(app, "patch", "--model", tiny_dir, "--task", "ioi", "--n", "2", "--sites", "head", "--layers", "2",
               "--out", tmp_path / "o", "-q", "--top", "2")
    assert r.exit_code == 0, r.output
    assert "head[2].h" in r.output and "head[0].h" not in r.output


@pytest.mark.parametrize("args,want", [
    ([], None),  # not given: AtPStarConfig's own default
    (["--grad-drop-groups", "3"], 3),
    (["--grad-drop-groups", "0"], "per-layer"),
])
def test_compare_grad_drop_groups_reaches_the_atp_star_config(monkeypatch, args, want):
    """What `compare --grad-drop-groups` hands to AtP*'s config (captured before anything loads)."""
    from patchtrace.methods import compare as cmp
    from patchtrace.methods.atp_star import AtPStarConfig

    seen: dict = {}
    reached = []
    real = cmp.CompareConfig

    def capture(**kw):
        real(**kw)  # the options are valid
        seen.update(kw["options"]["atp_star"])
        reached.append(True)
        raise KeyboardInterrupt  # stop before the model loads

    monkeypatch.setattr(cmp, "CompareConfig", capture)
    CliRunner().invoke(build_app(), ["compare", "--methods", "atp_star", *args])
    assert reached
    cfg = AtPStarConfig(**seen)
    assert cfg.grad_drop
    if want is None:
        assert "grad_drop_groups" not in seen and cfg.grad_drop_groups == AtPStarConfig().grad_drop_groups
    elif want == "per-layer":
        assert cfg.grad_drop_groups is None
    else:
        assert cfg.grad_drop_groups == want


def test_compare_refuses_one_grad_drop_group_before_loading():
    r = CliRunner().invoke(build_app(), ["compare", "--methods", "atp_star", "--grad-drop-groups", "1"])
    assert r.exit_code == 2 and "grad_drop_groups" in r.output
