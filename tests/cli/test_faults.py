"""The CLI's error boundary as a tested property: a fault battery generated from the app itself.

Every registered command (found by walking the typer app, command groups included, so a command
added tomorrow is covered without editing this file) gets, for each of its options, the bad values
of that option's *role* (its name: ``--model``, ``--task``, ``--sites``, ``--out`` ...) or, for a
number without a known role, of its *type* (negative and zero counts, NaN, infinity, text). Each
case runs in-process through typer's ``CliRunner`` on a tiny random Llama saved to disk, in an empty
working folder, and must end with

* exit code 2 (1 is reserved for bugs: an exception the boundary did not expect);
* exactly one line on stderr, starting ``error:``, that names the offending value;
* no traceback anywhere;
* nothing written outside the case's output folder (the working folder, the inputs, the model).

The inputs (damaged result folders, malformed task files, unwritable paths) are built once per
module. An option whose role and type give no bad value (free text such as ``--title``, flags) is
listed by :func:`test_battery_covers_every_command`, which also fails if a command has no case.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from patchtrace.cli import build_app
from patchtrace.results import Scores

runner = CliRunner()


# -- the bad values ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One bad value: ``value`` may hold ``{placeholders}`` filled from the inputs built per module;
    ``needle`` (default: the value itself) is what the error line must contain (one of them, for a tuple)."""

    label: str
    value: str
    needle: str | tuple[str, ...] | None = None


_RESULTS_FOLDERS = (
    Bad("missing folder", "{missing}/results", "results"),
    Bad("a file", "{a_file}", "a_file.txt"),
    Bad("empty folder", "{empty_dir}", "empty_dir"),
    Bad("invalid scores.json", "{bad_json}", "bad_json"),
    Bad("truncated scores.safetensors", "{truncated}", "truncated"),
    Bad("scores.safetensors changed after saving", "{tampered_tensors}", "scores.safetensors"),
    Bad("scores.json edited after saving", "{tampered_json}", "scores.json"),
)
_OUT_FOLDERS = (
    Bad("existing file", "{a_file}", "a_file.txt"),
    Bad("under a file", "{a_file}/sub", "a_file.txt"),
    Bad("unwritable (read-only fs)", "{unwritable}/out", "{unwritable}"),
)
_OUT_FILES = (
    Bad("existing folder", "{empty_dir}", "empty_dir"),
    Bad("under a file", "{a_file}/x.html", "a_file.txt"),
    Bad("unwritable (read-only fs)", "{unwritable}/x.html", "{unwritable}"),
)
_DATA_FILES = (
    Bad("missing file", "{missing}/data.jsonl", "data.jsonl"),
    Bad("invalid JSON", "{bad_jsonl}", "bad.jsonl"),
    Bad("empty file", "{empty_jsonl}", "empty.jsonl"),
    Bad("not UTF-8", "{latin1_jsonl}", "latin1.jsonl"),
    Bad("records without the fields", "{wrong_fields_jsonl}", "wrong_fields.jsonl"),
)
_CHOICE = (Bad("unknown name", "nosuch-choice"),)
_INPUT_FOLDERS = (
    Bad("missing folder", "{missing}/input-folder", "input-folder"),
    Bad("a file", "{a_file}", "a_file.txt"),
    Bad("empty folder", "{empty_dir}", "empty_dir"),
)
_MODELS = (
    Bad("missing folder", "{missing}/no-such-model", "no-such-model"),
    Bad("a file", "{a_file}", "a_file.txt"),
    Bad("folder without config.json", "{empty_dir}", "empty_dir"),
    Bad("hub id, no network", "nobody-xyz/no-such-model", "no-such-model"),
)

#: Bad values by option name (the option's role). Commands share these names through cli/common.py.
ROLE_VALUES: dict[str, tuple[Bad, ...]] = {
    "model": _MODELS,
    "base": _MODELS,
    "tuned": _MODELS,
    "patch": _INPUT_FOLDERS,
    "localize": _RESULTS_FOLDERS,
    "queries": _DATA_FILES,
    "task": (
        Bad("unknown name", "nosuchtask"),
        *_DATA_FILES,
        Bad("answer equals wrong", "{same_answer_jsonl}", "same_answer"),
        Bad("clean equals corrupt", "{same_prompt_jsonl}", "same_prompt"),
    ),
    "data": _DATA_FILES,
    "desiderata": _DATA_FILES,
    "sites": (Bad("unknown kind", "hed"), Bad("empty list", ",", ("--sites", "','")), Bad("repeated kind", "head,head")),
    "positions": (
        Bad("past the end", "99"),
        Bad("before the start", "-99"),
        Bad("not a position", "lastish"),
        Bad("empty list", ",", ("--positions", "','")),
    ),
    "layers": (Bad("out of range", "29"), Bad("backwards range", "5-2"), Bad("not a layer", "x")),
    "heads": (Bad("layer out of range", "29.0", "29"), Bad("head out of range", "0.99", "99"),
              Bad("malformed", "x"), Bad("empty list", ",", ("--heads", "','"))),
    "steer_heads": (Bad("layer out of range", "29.0", "29"), Bad("malformed", "x")),
    "methods": (Bad("unknown method", "nosuch"), Bad("empty list", ",", ("--methods", "','"))),
    "metric": (Bad("unknown metric", "acc"),),
    "direction": (Bad("unknown direction", "sideways"),),
    "by": (Bad("unknown order", "sideways"),),
    "device": (Bad("unknown device", "tpu"), Bad("no such GPU", "cuda:99")),
    "dtype": (Bad("unknown dtype", "float7"), Bad("not a float dtype", "int8")),
    "max_memory": (
        Bad("too small", "1KB"), Bad("negative", "-1GB"), Bad("more than the machine", "1PB"),
        Bad("unknown unit", "4 parsecs"),
    ),
    "executor": _CHOICE,
    "method": _CHOICE,
    "pipeline": _CHOICE,
    "scheme": _CHOICE,
    "mode": _CHOICE,
    "select": _CHOICE,
    "kind": _CHOICE,
    "agg": _CHOICE,
    "fmt": _CHOICE,
    "gate": _CHOICE,
    "parametrization": _CHOICE,
    "target": _CHOICE,
    "out": _OUT_FOLDERS,
    "html": _OUT_FILES,
    "path": _RESULTS_FOLDERS,
    "circuit": _RESULTS_FOLDERS,
}

#: Integer options that are seeds (any integer is a valid seed) or indices (0 is valid).
SEEDS = re.compile(r"(^|_)seed$")
INDICES = re.compile(r"(^|_)(layer|head|position|pos|index|step_at)$")
#: Float options for which a negative value means something (a steering strength can push away).
SIGNED_FLOATS = frozenset({"steer", "min_margin", "scale"})  # weights --scale -1: subtract the patch
#: Options with no bad value of their own, and why.
NOT_TESTED = {"ray_address": "needs a Ray cluster (tests/engine/test_ray.py covers an unreachable one)"}
#: Options whose name is a role elsewhere but means something else in this command (free text here).
ROLE_OVERRIDES: dict[tuple[str, ...], frozenset[str]] = {
    ("xpatch",): frozenset({"source", "target"}),  # the two prompts, not a choice of target
}
#: Bad values that are valid for one command, and why.
VALID_HERE: dict[tuple[str, ...], frozenset[str]] = {
    # fine-tuning learns prompt -> answer only: a task's `wrong` and corrupt prompt are not read
    ("finetune",): frozenset({"answer equals wrong", "clean equals corrupt"}),
}
#: A count whose default is 0, or whose help says what 0 means ("0: none"), takes 0 as a valid value.
ZERO_MEANS = re.compile(r"\b0\s*(:|=|means)\s*\w")


def zero_allowed(param: Any) -> bool:
    return getattr(param, "default", None) == 0 or bool(ZERO_MEANS.search(getattr(param, "help", None) or ""))


def type_values(name: str, kind: type | None) -> tuple[Bad, ...]:
    """Bad values of an option without a role, from its type."""
    if kind is int:
        if SEEDS.search(name):
            return (Bad("not an integer", "abc"),)
        if INDICES.search(name):
            return (Bad("out of range", "999"), Bad("not an integer", "abc"))
        return (Bad("negative count", "-1"), Bad("zero count", "0"), Bad("not an integer", "abc"))
    if kind is float:
        bad = (Bad("NaN", "nan"), Bad("infinite", "inf"), Bad("not a number", "abc"))
        return bad if name in SIGNED_FLOATS else (*bad, Bad("negative", "-1"))
    return ()


# -- the app's commands and options --------------------------------------------------------------------

#: Cheap settings used for every option not under test (a tiny model, few examples, one step).
BASE = {"model": "{model}", "n": "2", "steps": "1", "samples": "2", "ig_steps": "1", "layers": "0", "top": "3",
        "task": "ioi", "path": "{good}", "circuit": None, "window": "1", "max_new_tokens": "1", "heads": "0.1",
        "prompts": "1", "seeds": "0"}
#: Options that cannot be combined with the tested one (left at their defaults when it is tested).
EXCLUSIVE = {"circuit": ("heads",)}
#: Per-command settings where the shared ones do not fit the tiny model (the integrator extends this
#: when a new command needs a good value the battery cannot guess).
COMMAND_BASE: dict[str, dict[str, str]] = {
    "trace": {"task": "{subject_jsonl}"},  # causal tracing needs meta['subject']
    "compare": {"sites": "resid_pre", "methods": "atp"},  # --positions applies to items without '@'
    "circuit": {"edges": "5"},  # the tiny model's graph has fewer edges than the default budget
    "twohop": {"model": None},
    "weights apply": {"model": "{w_base_dir}", "patch": "{w_patch}"},  # a folder, as --out is
    "weights remove": {"model": "{w_base_dir}", "patch": "{w_patch}"},
    "weights quantize": {"patch": "{w_patch}"},
    "weights compose": {"patches": "{w_patch}"},
    "weights extract": {"base": "{w_base}", "tuned": "{w_tuned}"},
    "finetune": {"localize": "{good}", "k": "1"},
    "t2i text-edit": {"t_starts": "0"},  # the default 0,2,4 is past BASE's one sampling step
    "xpatch": {"source": "Lyon is in", "target": "Paris is in", "write": "resid_post[0]@-1->resid_post[0]@-1"},  # type: ignore[dict-item]  # --model is only read with --classify (refused without)
}
#: Flags set for every case (quiet progress bars).
FLAGS = ("quiet",)


def _annotation(param: Any) -> type | None:
    desc = getattr(param, "type_descriptor", None)
    ann = getattr(desc, "annotation", None)
    if isinstance(ann, type):
        return ann
    default = getattr(param, "default", None)
    return type(default) if isinstance(default, int | float) and not isinstance(default, bool) else None


def walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """``(words, click command)`` for every leaf command of the app (groups are walked)."""
    subs = getattr(command, "commands", None)
    if subs:
        for name, sub in sorted(subs.items()):
            yield from walk(sub, (*path, name))
    elif path:
        yield path, command


def is_flag(param: Any) -> bool:
    return bool(getattr(param, "is_flag", False)) or _annotation(param) is bool


def bad_values(param: Any, words: tuple[str, ...] = ()) -> tuple[Bad, ...]:
    """The bad values of one option or argument of command ``words``: its role's, else its type's."""
    if param.name in NOT_TESTED or is_flag(param) or getattr(param, "hidden", False):
        return ()
    role = None if param.name in ROLE_OVERRIDES.get(words, ()) else ROLE_VALUES.get(param.name)
    bad = role or type_values(param.name, _annotation(param))
    valid = VALID_HERE.get(words, frozenset())
    return tuple(b for b in bad if b.label not in valid and not (b.label == "zero count" and zero_allowed(param)))


def _word(param: Any) -> str | None:
    """The option's ``--name`` (None for a positional argument)."""
    opts = [o for o in getattr(param, "opts", []) if o.startswith("--")]
    return opts[0] if opts and not _is_argument(param) else None


def _is_argument(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "argument"


APP = build_app()
COMMANDS = dict(walk(typer.main.get_command(APP)))


def cases() -> list[Any]:
    out = []
    for words, cmd in COMMANDS.items():
        for param in cmd.params:
            if param.name == "help":
                continue
            for bad in bad_values(param, words):
                out.append(pytest.param(words, param.name, bad, id=f"{' '.join(words)} {param.name}={bad.label}"))
    return out


CASES = cases()


def base_args(
    cmd: Any, tested: str, bad: str, fill: dict[str, str], out: Path, words: tuple[str, ...] = ()
) -> list[str] | str:
    """The command line with ``tested`` set to ``bad`` and every other option at its cheap setting
    (positional arguments in their order), or the name of a required parameter that has no known
    good value (the command cannot be exercised)."""
    base = {**BASE, **COMMAND_BASE.get(" ".join(words), {})}
    args: list[str] = []
    positional: list[str] = []
    for p in cmd.params:
        if p.name == tested:
            if _is_argument(p):
                positional.append(bad)
            else:
                args.append(f"{_word(p)}={bad}")
            continue
        if p.name == "help" or p.name in EXCLUSIVE.get(tested, ()):
            continue
        word = _word(p)
        if p.name == "out":
            value: str | None = str(out)
        elif p.name in base:
            value = base[p.name]
        elif p.name in FLAGS and is_flag(p):
            args.append(word or "")
            continue
        else:
            value = None
        if value is None:
            if p.required:
                return str(p.name)
            continue
        value = value.format(**fill)
        if _is_argument(p):
            positional.append(value)
        elif word:
            args += [word, value]
    return [*positional, *args]


# -- the inputs ----------------------------------------------------------------------------------------


def _unwritable(root: Path) -> str:
    """A folder no one can create anything in: a path on a read-only file system (``/sys`` on Linux;
    even root cannot write there), else a folder made read-only (works for a non-root user)."""
    probe = Path("/sys/patchtrace-fault-probe")
    try:
        probe.mkdir()
    except OSError:
        return "/sys/patchtrace-faults"
    probe.rmdir()
    ro = root / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    return str(ro / "x")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, smol_tokenizer) -> dict[str, str]:
    from conftest import make_tiny

    root = tmp_path_factory.mktemp("faults")
    model = root / "tiny-llama"
    make_tiny("llama", seed=5, tokenizer=smol_tokenizer).hf.save_pretrained(model, safe_serialization=True)
    smol_tokenizer.save_pretrained(model)
    d = root / "inputs"
    d.mkdir()
    (d / "a_file.txt").write_text("not a folder\n")
    (d / "empty_dir").mkdir()
    good = Scores(torch.tensor([[0.5, -0.25], [0.125, 1.0]]), ("layer", "head"), "head",
                  baselines={"clean": 2.0, "corrupt": -1.0}).save(d / "good")
    for name in ("bad_json", "truncated", "tampered_tensors", "tampered_json"):
        Scores.load(good).save(d / name)
    (d / "bad_json" / "scores.json").write_text('{"format_version": 1, "axes": [')
    blob = (d / "truncated" / "scores.safetensors").read_bytes()
    (d / "truncated" / "scores.safetensors").write_bytes(blob[: len(blob) // 2])
    t = d / "tampered_tensors" / "scores.safetensors"
    data = bytearray(t.read_bytes())
    data[-1] ^= 0x01  # one bit of the last value: still a valid file, a different number
    t.write_bytes(bytes(data))
    meta = json.loads((d / "tampered_json" / "scores.json").read_text())
    meta["baselines"]["clean"] = 3.0
    (d / "tampered_json" / "scores.json").write_text(json.dumps(meta))
    ioi = {"clean": "When Mary and John went to the park, John gave a book to",
           "corrupt": "When Mary and John went to the park, Mary gave a book to", "answer": " Mary", "wrong": " John"}
    (d / "bad.jsonl").write_text('{"clean": "x", \n')
    (d / "empty.jsonl").write_text("")
    (d / "latin1.jsonl").write_bytes(json.dumps({**ioi, "answer": " Zoë"}, ensure_ascii=False).encode("latin-1"))
    (d / "wrong_fields.jsonl").write_text(json.dumps({"prompt": "hello", "label": 1}) + "\n")
    (d / "same_answer.jsonl").write_text(json.dumps({**ioi, "wrong": " Mary"}) + "\n")
    (d / "same_prompt.jsonl").write_text(json.dumps({**ioi, "corrupt": ioi["clean"]}) + "\n")
    fact = {"clean": "The capital of France is the city of", "corrupt": "The capital of Italy is the city of",
            "answer": " Paris", "wrong": " Rome", "subject": "France"}
    g = torch.Generator().manual_seed(0)
    w_base = {"fc.weight": torch.randn(4, 3, generator=g), "fc.bias": torch.randn(4, generator=g)}
    save_file(w_base, str(d / "w_base.safetensors"), metadata={"format": "pt"})
    (d / "w_base_dir").mkdir()  # a model folder: `weights apply/remove` write a folder --out for it
    save_file(w_base, str(d / "w_base_dir" / "model.safetensors"), metadata={"format": "pt"})
    save_file({k: v + 0.5 for k, v in w_base.items()}, str(d / "w_tuned.safetensors"), metadata={"format": "pt"})
    made = runner.invoke(APP, ["weights", "extract", str(d / "w_base.safetensors"), str(d / "w_tuned.safetensors"),
                               "--out", str(d / "w_patch")])
    assert made.exit_code == 0, made.output
    (d / "subject.jsonl").write_text(json.dumps(fact) + "\n" + json.dumps({**fact, "answer": " Rome", "wrong": " Paris"}) + "\n")
    return {
        "model": str(model), "good": str(good), "missing": str(root / "missing"), "a_file": str(d / "a_file.txt"),
        "empty_dir": str(d / "empty_dir"), "bad_json": str(d / "bad_json"), "truncated": str(d / "truncated"),
        "tampered_tensors": str(d / "tampered_tensors"), "tampered_json": str(d / "tampered_json"),
        "bad_jsonl": str(d / "bad.jsonl"), "empty_jsonl": str(d / "empty.jsonl"),
        "latin1_jsonl": str(d / "latin1.jsonl"), "wrong_fields_jsonl": str(d / "wrong_fields.jsonl"),
        "same_answer_jsonl": str(d / "same_answer.jsonl"), "same_prompt_jsonl": str(d / "same_prompt.jsonl"),
        "subject_jsonl": str(d / "subject.jsonl"), "w_base": str(d / "w_base.safetensors"), "w_base_dir": str(d / "w_base_dir"),
        "w_tuned": str(d / "w_tuned.safetensors"), "w_patch": str(d / "w_patch"),
        "unwritable": _unwritable(root), "root": str(root),
    }


class ComputeReached(Exception):
    """Raised on the first forward pass of any module during a battery case: a bad value must be
    refused before any compute (a global forward pre-hook, so it holds for every model a command
    builds: the patched LM, a diffusion pipeline, a scorer ...)."""


def _no_compute(module: Any, args: Any) -> None:
    raise ComputeReached(
        f"the model ran a forward pass ({type(module).__name__}) with a bad value on the command line: "
        "it must be refused before any compute"
    )


@pytest.fixture(scope="module")
def loaded_once():
    """Load each model spec once for the whole battery (a failing load is not cached: it raises each
    time). Together with the global hook of each case (every module raises :class:`ComputeReached`
    on forward), a bad value that is only noticed during (or after) compute fails its case, and no
    case spends time computing."""
    import patchtrace.models.load as load_mod

    cache: dict[tuple, Any] = {}
    real = load_mod.load_model

    def cached(spec: str = load_mod.DEFAULT_MODEL, **kw: Any) -> Any:
        key = (spec, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in cache:
            cache[key] = real(spec, **kw)
        return cache[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(load_mod, "load_model", cached)
    yield real
    mp.undo()


def snapshot(*roots: Path) -> set[str]:
    return {str(p) for r in roots if r.exists() for p in r.rglob("*")}


def stderr_lines(result: Any) -> list[str]:
    """The non-empty lines on stderr (progress bars' carriage returns count as line ends)."""
    return [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]


def assert_one_error_line(result: Any, shown: str) -> str:
    """Exactly one ``error:`` line, and it is the last thing on stderr (progress and status lines a
    command printed before it are allowed: they are not part of the error); returns it."""
    lines = stderr_lines(result)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], shown
    assert not any(line.lstrip().startswith('File "') for line in lines), shown
    return errors[0]


# -- the battery -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("words", "option", "bad"), CASES)
def test_bad_input_is_one_named_error(words, option, bad, inputs, loaded_once, tmp_path, monkeypatch):
    cmd = COMMANDS[words]
    out = tmp_path / "out"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args = base_args(cmd, option, bad.value.format(**inputs), inputs, out, words)
    if isinstance(args, str):
        pytest.skip(f"{' '.join(words)}: required parameter {args!r} has no known good value (add one to BASE "
                    "or COMMAND_BASE to exercise this command)")
    watched = (cwd, Path(inputs["root"]))
    before = snapshot(*watched)
    from torch.nn.modules.module import register_module_forward_pre_hook

    guard = register_module_forward_pre_hook(_no_compute)
    try:
        result = runner.invoke(APP, [*words, *args])
    finally:
        guard.remove()
    shown = f"patchtrace {' '.join(words)} {' '.join(args)}\nexit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr, shown
    assert result.exit_code == 2, shown
    line = assert_one_error_line(result, shown)
    needles = bad.needle if isinstance(bad.needle, tuple) else (bad.needle or bad.value,)
    assert any(n.format(**inputs) in line for n in needles), f"none of {needles} named\n{shown}"
    new = {p for p in snapshot(*watched) - before if not p.startswith(str(out))}
    assert not new, f"written outside the output folder: {sorted(new)}\n{shown}"


def test_battery_covers_every_command():
    """Every command with parameters has cases; the options left out are the flags, free text and
    the listed :data:`NOT_TESTED` ones (printed, so a reader sees what the battery does not try)."""
    covered = {c.values[0] for c in CASES}
    uncovered = []
    for words, cmd in COMMANDS.items():
        params = [p for p in cmd.params if p.name != "help"]
        untested = [p.name for p in params if not bad_values(p, words) and not is_flag(p)]
        uncovered += [f"{' '.join(words)} --{n}" for n in untested]
        checkable = [p for p in params if p.name in ROLE_VALUES or _annotation(p) in (int, float)]
        assert not checkable or words in covered, f"{' '.join(words)}: no bad-input case"
    print(f"\n{len(CASES)} (command, bad input) cases over {len(COMMANDS)} commands; options without cases: "
          + ", ".join(uncovered))
    assert len(CASES) >= 100  # non-vacuous: the walk found the commands and their options


def test_an_unexpected_exception_is_one_line_with_exit_1(monkeypatch):
    """A bug (an exception that is not about the input) is one line too, but with exit code 1, so the
    battery's exit-code-2 check tells a refused input from a crash."""
    import patchtrace.cli.common as common

    def boom(*a: Any, **k: Any) -> None:
        raise IndexError("list index out of range")

    monkeypatch.setattr(common, "parse_by", boom)
    result = runner.invoke(APP, ["show", "anything"])
    assert result.exit_code == 1, result.output
    line = assert_one_error_line(result, result.output)
    assert "internal error" in line and "IndexError" in line and "PATCHTRACE_DEBUG" in line
    monkeypatch.setenv("PATCHTRACE_DEBUG", "1")
    result = runner.invoke(APP, ["show", "anything"])
    assert isinstance(result.exception, IndexError)  # the traceback is there when asked for


def test_disk_full_while_saving_is_one_line(inputs, loaded_once, tmp_path, monkeypatch):
    """An I/O failure in the middle of a run (the disk fills up while the results are written)."""
    import errno

    import safetensors.torch

    import patchtrace.models.load as load_mod

    monkeypatch.setattr(load_mod, "load_model", loaded_once)  # this run computes: the real loader

    def full(*a: Any, **k: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o" / "scores.safetensors"))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    result = runner.invoke(APP, ["patch", "--model", inputs["model"], "--n", "2", "--sites", "resid_pre", "--layers",
                                 "0", "--out", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 2, result.output
    line = assert_one_error_line(result, result.output)
    assert "No space left on device" in line and "scores.safetensors" in line and "disk is full" in line, line


def test_usage_errors_are_one_line_naming_the_value():
    for args, needles in (
        (["patch", "--n", "abc"], ("--n", "'abc'")),
        (["patch", "--nn", "3"], ("--nn",)),
        (["show"], ("path",)),
        (["no-such-command"], ("no-such-command",)),
    ):
        result = runner.invoke(APP, args)
        assert result.exit_code == 2, result.output
        line = assert_one_error_line(result, result.output)
        for n in needles:
            assert n in line, (n, line)



# -- inputs that used to fail and now work ------------------------------------------------------------


def test_jsonl_with_a_byte_order_mark_is_read(inputs, loaded_once, tmp_path, monkeypatch):
    """Editors on some systems start UTF-8 files with a byte-order mark; the task reads the same."""
    import patchtrace.models.load as load_mod
    from patchtrace.tasks import make_task

    rec = {"clean": "When Mary and John went to the park, John gave a book to",
           "corrupt": "When Mary and John went to the park, Mary gave a book to", "answer": " Mary", "wrong": " John"}
    plain, bom = tmp_path / "plain.jsonl", tmp_path / "bom.jsonl"
    plain.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    bom.write_text(json.dumps(rec) + "\n", encoding="utf-8-sig")
    assert bom.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert make_task(str(bom)).examples == make_task(str(plain)).examples
    csv = tmp_path / "bom.csv"
    csv.write_text("clean,corrupt,answer,wrong\n" + ",".join(json.dumps(rec[k]) for k in ("clean", "corrupt", "answer", "wrong"))
                   + "\n", encoding="utf-8-sig")
    assert make_task(str(csv)).examples == make_task(str(plain)).examples
    monkeypatch.setattr(load_mod, "load_model", loaded_once)
    r = runner.invoke(APP, ["patch", "--model", inputs["model"], "--task", str(bom), "--sites", "resid_pre", "--layers",
                            "0", "--out", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 0, r.output
    assert Scores.load(tmp_path / "o").provenance["task"]["name"] == "bom"


def test_show_and_report_walk_a_compare_folder(tmp_path):
    """``compare --out X`` writes ``X/<method>/<kind>/``: show and report find them there."""
    vals = {"activation_patching": torch.tensor([0.5, 2.0]), "atp": torch.tensor([0.25, 1.5])}
    for method, v in vals.items():
        Scores(v, ("layer",), "resid_pre", baselines={"clean": 2.0, "corrupt": 0.0}).save(tmp_path / method / "resid_pre")
    (tmp_path / "report.json").write_text("{}")
    shown = runner.invoke(APP, ["show", str(tmp_path), "--top", "1"])
    assert shown.exit_code == 0, shown.output
    for method in vals:
        assert str(tmp_path / method / "resid_pre") in shown.stdout
    assert "+2.0000" in shown.stdout and "+1.5000" in shown.stdout  # each folder's own top value
    rep = runner.invoke(APP, ["report", str(tmp_path)])
    assert rep.exit_code == 0, rep.output
    assert (tmp_path / "atp" / "resid_pre" / "heatmap.png").is_file() and (tmp_path / "report.html").is_file()


def test_degenerate_examples_run_only_when_asked_with_a_warning_naming_them(inputs, loaded_once, tmp_path, monkeypatch):
    import patchtrace.models.load as load_mod

    monkeypatch.setattr(load_mod, "load_model", loaded_once)
    base = ["patch", "--model", inputs["model"], "--task", inputs["same_answer_jsonl"], "--sites", "resid_pre",
            "--layers", "0", "-q"]
    refused = runner.invoke(APP, [*base, "--out", str(tmp_path / "a")])
    assert refused.exit_code == 2 and "example(s) 0" in refused.stderr and "--allow-degenerate" in refused.stderr
    allowed = runner.invoke(APP, [*base, "--out", str(tmp_path / "b"), "--allow-degenerate"])
    assert allowed.exit_code == 0, allowed.output
    warning = [line for line in allowed.stderr.splitlines() if line.startswith("warning:")]
    assert warning and "example(s) 0" in warning[0] and "same token" in warning[0], allowed.stderr


def test_inside_a_command_group_the_line_names_the_leaf_command():
    """``patchtrace weights apply --scale abc``: the hint is the leaf's ``--help``, not the group's."""
    leaves = [(w, p) for w, cmd in COMMANDS.items() if len(w) > 1 and not any(q.required for q in cmd.params)
              for p in cmd.params if _annotation(p) in (int, float) and not _is_argument(p)]
    if not leaves:
        pytest.skip("no command group with a numeric option is registered")
    words, param = leaves[0]
    result = runner.invoke(APP, [*words, f"{_word(param)}=abc"])
    assert result.exit_code == 2, result.output
    line = assert_one_error_line(result, result.output)
    assert f"patchtrace {' '.join(words)} --help" in line and "'abc'" in line, line
