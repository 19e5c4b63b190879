"""``patchtrace weights …`` over files: round trips checked against the tensors computed by hand,
and every bad input is one red line with exit code 2 naming the item."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from patchtrace.cli import build_app

runner = CliRunner()


@pytest.fixture(scope="module")
def app():
    return build_app(strict=True)


@pytest.fixture()
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"conv1.weight": torch.randn(4, 1, 3, 3, generator=g), "conv1.bias": torch.randn(4, generator=g),
            "fc.weight": torch.randn(10, 36, generator=g), "fc.bias": torch.randn(10, generator=g)}
    tuned = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    other = {k: v + 1.0 for k, v in base.items()}
    for name, t in (("base", base), ("tuned", tuned), ("other", other)):
        save_file(t, str(tmp_path / f"{name}.safetensors"), metadata={"format": "pt"})
    return tmp_path, base, tuned


def ok(app, args):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return r.output


def test_extract_apply_remove_quantize_compose_round_trip(app, files):
    d, base, tuned = files
    out = ok(app, ["weights", "extract", str(d / "base.safetensors"), str(d / "tuned.safetensors"), "--out", str(d / "p"),
                   "--select", "conv1.*"])
    assert "conv1.weight" in out and "fc.weight" not in out
    ok(app, ["weights", "apply", str(d / "base.safetensors"), str(d / "p"), "--out", str(d / "new.safetensors"), "--scale", "0.5"])
    new = load_file(str(d / "new.safetensors"))
    delta = (tuned["conv1.weight"].double() - base["conv1.weight"].double()).float()
    assert torch.equal(new["conv1.weight"], base["conv1.weight"] + delta * 0.5)
    assert torch.equal(new["fc.weight"], base["fc.weight"])
    assert (d / "new.undo.safetensors").is_file()
    out = ok(app, ["weights", "remove", str(d / "new.safetensors"), str(d / "p"), "--out", str(d / "old.safetensors")])
    assert "bit for bit" in out and "matches the patch's base hash" in out
    old = load_file(str(d / "old.safetensors"))
    assert all(torch.equal(old[k], base[k]) for k in base)
    out = ok(app, ["weights", "quantize", str(d / "p"), "--levels", "4", "--scheme", "tanh", "--out", str(d / "q")])
    assert "smaller" in out
    meta = json.loads((d / "q" / "patch.json").read_text())
    assert meta["quant"]["conv1.weight"]["bits"] == 2
    ok(app, ["weights", "extract", str(d / "base.safetensors"), str(d / "tuned.safetensors"), "--out", str(d / "f"),
             "--select", "fc.*"])
    ok(app, ["weights", "compose", str(d / "p"), str(d / "f"), "--weights", "1,-2", "--out", str(d / "pf")])
    info = ok(app, ["weights", "info", str(d / "pf")])
    assert "compose" in info and "fc.bias" in info and "conv1.bias" in info
    ok(app, ["weights", "apply", str(d / "base.safetensors"), str(d / "pf"), "--out", str(d / "pf.safetensors")])
    got = load_file(str(d / "pf.safetensors"))["fc.bias"]
    want = base["fc.bias"] + (-2.0 * (tuned["fc.bias"].double() - base["fc.bias"].double())).float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_model_folder_keeps_its_other_files_and_loads(app, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    tuned = LlamaForCausalLM(cfg)
    tuned.save_pretrained(tmp_path / "tuned")
    ok(app, ["weights", "extract", str(tmp_path / "base"), str(tmp_path / "tuned"), "--out", str(tmp_path / "p"), "--select", "1"])
    ok(app, ["weights", "apply", str(tmp_path / "base"), str(tmp_path / "p"), "--out", str(tmp_path / "new")])
    assert (tmp_path / "new" / "config.json").is_file() and (tmp_path / "new" / "patchtrace-undo.safetensors").is_file()
    m = LlamaForCausalLM.from_pretrained(tmp_path / "new")
    t = tuned.state_dict()
    b = LlamaForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, t[k] if k.startswith("model.layers.1.") else b[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["weights", "quantize", "{d}/p", "--levels", "1", "--out", "{d}/q"], "levels 1"),
        (["weights", "extract", "{d}/base.safetensors", "{d}/tuned.safetensors", "--out", "{d}/x", "--select", "nope.*"], "selector 'nope.*'"),
        (["weights", "apply", "{d}/other.safetensors", "{d}/p", "--out", "{d}/o.safetensors"], "allow-other-base"),
        (["weights", "apply", "{d}/missing.safetensors", "{d}/p", "--out", "{d}/o.safetensors"], "missing.safetensors: no such"),
        (["weights", "compose", "{d}/p", "{d}/p", "--weights", "1", "--out", "{d}/c"], "1 weights for 2 patches"),
        (["weights", "info", "{d}/tampered"], "checksum"),
        (["weights", "apply", "{d}/base.safetensors", "{d}/p", "--out", "{d}/tuned.safetensors"], "exists"),
        # a model file goes to a .safetensors file (a suffix-less --out used to end in an internal error
        # after writing the model there and failing to put the undo file "inside" it)
        (["weights", "apply", "{d}/base.safetensors", "{d}/p", "--out", "{d}/o"], "--out must be a .safetensors"),
        (["weights", "remove", "{d}/base.safetensors", "{d}/p", "--out", "{d}/o"], "--out must be a .safetensors"),
    ],
)
def test_bad_input_exit_code_2_naming_the_item(app, files, args, match):
    d, _, _ = files
    ok(app, ["weights", "extract", str(d / "base.safetensors"), str(d / "tuned.safetensors"), "--out", str(d / "p"), "--select", "conv1.*"])
    ok(app, ["weights", "extract", str(d / "base.safetensors"), str(d / "tuned.safetensors"), "--out", str(d / "tampered")])
    raw = bytearray((d / "tampered" / "patch.safetensors").read_bytes())
    raw[-1] ^= 1
    (d / "tampered" / "patch.safetensors").write_bytes(bytes(raw))
    r = runner.invoke(app, [a.format(d=d) for a in args])
    assert r.exit_code == 2, r.output
    assert match in r.output and "Traceback" not in r.output
    assert not (d / "o.safetensors").exists() and not (d / "o").exists()
