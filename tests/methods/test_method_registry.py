"""The method registry, the config checks, the progress protocol, ``patchtrace methods`` and ``compare``
iterating the registry (a method registered here is compared without any edit to compare)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny
from patchtrace import SiteSpec, make_task
from patchtrace.cli import build_app
from patchtrace.errors import PatchtraceError
from patchtrace.methods import atp, compare, get_method, list_methods, register_method, unregister_method
from patchtrace.methods.registry import MethodRegistryError, estimators_of
from patchtrace.methods.validate import ConfigError, check_float, check_int
from patchtrace.progress import counter, offset

BUILTINS = {"activation_patching", "causal_tracing", "atp", "atp_star", "ig", "relp", "dbm", "qa_circuit"}
runner = CliRunner()


@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    direction: str = "denoise"
    metric: str = "logit_diff"


def toy_run(model, task, sites, config=None, *, on_progress=None):
    return None


def _register(name: str, **kw):
    args = {"result": type(None), "description": "toy", "sweep": False, "tiny_config": ToyConfig,
            "tiny_inputs": lambda m: (None, None)}
    args.update(kw)
    config = args.pop("config", ToyConfig)
    run = args.pop("run", toy_run)
    return register_method(name, config, run, **args)


def test_builtins_are_registered_once_each():
    names = [m.name for m in list_methods()]
    assert BUILTINS <= set(names) and len(names) == len(set(names))
    assert {m.name for m in estimators_of("activation_patching")} == {"atp", "atp_star", "ig", "relp"}
    assert get_method("dbm").result.__name__ == "Mask" and get_method("causal_tracing").sweep


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(PatchtraceError) as e:
        get_method("atp*")
    assert "'atp*'" in str(e.value) and all(n in str(e.value) for n in BUILTINS)


def test_register_and_unregister():
    spec = _register("toy_method")
    try:
        assert get_method("toy_method") is spec and list_methods()[-1] is spec
        with pytest.raises(MethodRegistryError, match="already registered"):
            _register("toy_method", run=lambda model, task, sites, config, *, on_progress=None: None)
        _register("toy_method", description="again")  # re-import of the same module: allowed
        assert get_method("toy_method").description == "again"
    finally:
        unregister_method("toy_method")
    with pytest.raises(MethodRegistryError):
        get_method("toy_method")


@dataclass(frozen=True)
class PositionalConfig:
    steps: int = 1


@dataclass(kw_only=True)
class MutableConfig:
    steps: int = 1


@pytest.mark.parametrize(("kw", "needle"), [
    ({"config": PositionalConfig}, "keyword-only"),
    ({"config": MutableConfig}, "frozen"),
    ({"config": dict}, "not a dataclass"),
    ({"run": lambda model, task, config, sites, *, on_progress=None: None}, "(model, task, sites, config)"),
    ({"run": lambda model, task, sites, config, extra=None, *, on_progress=None: None}, "keyword-only"),
    ({"run": lambda model, task, sites, config: None}, "on_progress"),
])
def test_registrations_that_break_the_contract_are_refused(kw, needle):
    with pytest.raises(MethodRegistryError) as e:
        _register("broken_method", **kw)
    assert needle in str(e.value)
    assert "broken_method" not in [m.name for m in list_methods()]


def test_estimator_needs_direction_and_metric_and_a_good_name():
    @dataclass(frozen=True, kw_only=True)
    class NoDirection:
        metric: str = "logit_diff"

    with pytest.raises(MethodRegistryError, match="direction and metric"):
        _register("broken_estimator", config=NoDirection, estimates="activation_patching")
    with pytest.raises(MethodRegistryError, match="lower-case"):
        _register("Atp-Star")


def test_config_checks_name_field_and_value():
    @dataclass(frozen=True, kw_only=True)
    class C:
        n: int = 1
        p: float = 0.5

        def __post_init__(self) -> None:
            check_int(self, "n", low=1)
            check_float(self, "p", low=0.0, high=1.0, open_low=True)

    for kw, needle in [({"n": 0}, "C.n: 0 is below the minimum 1"), ({"n": True}, "C.n: True is not an integer"),
                       ({"p": 0.0}, "C.p: 0.0 is outside (0, 1]"), ({"p": math.nan}, "C.p: nan is not a finite"),
                       ({"p": "0.5"}, "C.p: '0.5' is not a finite")]:
        with pytest.raises(ConfigError) as e:
            C(**kw)
        assert needle in str(e.value)
    assert C(n=3, p=1).p == 1


def test_sideways_direction_is_refused_everywhere():
    for spec in [*estimators_of("activation_patching"), get_method("activation_patching")]:
        with pytest.raises(ConfigError, match="'sideways'"):
            spec.config(direction="sideways")
    with pytest.raises(ConfigError, match="'sideways'"):
        compare.CompareConfig(direction="sideways")  # type: ignore[arg-type]


def test_compare_config_options_are_checked_when_built():
    with pytest.raises(ConfigError, match="'dbm' does not estimate"):
        compare.CompareConfig(options={"dbm": {}})
    with pytest.raises(ConfigError, match="set direction and metric"):
        compare.CompareConfig(options={"ig": {"direction": "noise"}})
    with pytest.raises(ConfigError, match="steps: 0"):
        compare.CompareConfig(options={"ig": {"steps": 0}})
    cfg = compare.CompareConfig(direction="noise", options={"ig": {"steps": 7}})
    ig_cfg = cfg.method_config("ig")
    assert (ig_cfg.direction, ig_cfg.steps) == ("noise", 7)


def test_progress_helpers():
    seen: list[tuple[int, int]] = []
    tick = counter(lambda d, t: seen.append((d, t)), 5)
    tick(2)
    tick(3)
    fwd = offset(lambda d, t: seen.append((d, t)), 5, 10)
    assert fwd is not None
    fwd(4, 5)
    assert seen == [(2, 5), (5, 5), (9, 10)]
    assert offset(None, 1, 2) is None
    counter(None, 3)(1)  # no callback: nothing to call, no error


# -- compare iterates the registry -------------------------------------------------------------------


def test_compare_includes_a_newly_registered_estimator(smol_tokenizer, tmp_path):
    model = make_tiny("llama", seed=3, tokenizer=smol_tokenizer)
    task = make_task("ioi", n=2, seed=0).tokenize(smol_tokenizer)
    spec = SiteSpec("attn_out", positions="last")

    def negated(model, task, sites, config=None, *, on_progress=None):  # a deliberately bad estimator
        s = atp.run(model, task, sites, config, on_progress=on_progress)
        return s.replace(values=-s.values)

    register_method("negated_atp", atp.AtPConfig, negated, result=compare.Scores, description="-AtP", sweep=False,
                    tiny_config=atp.AtPConfig, tiny_inputs=lambda m: (task.task, spec), estimates="activation_patching")
    try:
        res = compare.run(model, task, [spec], out_dir=tmp_path)
    finally:
        unregister_method("negated_atp")
    row = res.report["kinds"]["attn_out"]
    assert set(res.scores) == {"activation_patching", "atp", "atp_star", "ig", "relp", "negated_atp"}
    assert abs(row["atp"]["pearson"]) > 0.1  # non-vacuous: the two are correlated at all
    assert row["negated_atp"]["pearson"] == pytest.approx(-row["atp"]["pearson"], abs=1e-6)
    torch.testing.assert_close(res.scores["negated_atp"][0].values, -res.scores["atp"][0].values)
    assert (tmp_path / "negated_atp" / "attn_out" / "scores.json").is_file()
    assert (tmp_path / "scatter_negated_atp.png").is_file()


# -- the command line -------------------------------------------------------------------------------


def test_cli_methods_lists_the_registry():
    _register("toy_listed", description="a toy listed by the CLI")
    try:
        res = runner.invoke(build_app(strict=True), ["methods"], env={"COLUMNS": "200"})
    finally:
        unregister_method("toy_listed")
    assert res.exit_code == 0, res.output
    for spec in list_methods():
        assert spec.name in res.output
    assert "toy_listed" in res.output and "a toy listed by the CLI" in res.output
    assert "Mask" in res.output and "Scores" in res.output


@pytest.mark.parametrize(("args", "needle"), [
    (["--direction", "sideways"], "'sideways'"),
    (["--methods", "atp,magic"], "magic"),
    (["--ig-steps", "0"], "steps: 0"),
])
def test_cli_compare_refuses_bad_settings_before_loading(args, needle):
    res = runner.invoke(build_app(strict=True), ["compare", "--model", "./no-such-model", *args])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert needle in res.output


def test_causal_tracing_takes_sites_like_every_method(smol_tokenizer):
    from patchtrace.methods.causal_tracing import TracingConfig
    from patchtrace.sites import SiteError

    spec = get_method("causal_tracing")
    model = make_tiny("llama", seed=0, tokenizer=smol_tokenizer)
    task, _ = spec.tiny_inputs(model)
    with pytest.raises(SiteError, match="config was passed as sites"):
        spec.run(model, task, TracingConfig())
    for bad in (SiteSpec("head", per_unit=True, positions="all"), SiteSpec("mlp_out"),
                SiteSpec("resid_post", positions="all", layers=(0,))):
        with pytest.raises(SiteError, match="positions='all'"):
            spec.run(model, task, bad)
