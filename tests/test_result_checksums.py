"""Saved results carry SHA-256 checksums in their JSON; loading names the damaged file.

The checksums are compared with ``hashlib`` computed here on the bytes on disk (not with the
library's own helper), and each kind of damage is made by hand: a flipped bit in the tensor file
(still a valid safetensors file: without the checksum it would load as a wrong number), a truncated
tensor file, an edited number in the JSON, and invalid JSON.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from patchtrace.qa.generation import GenerationError
from patchtrace.results import ResultsError, Scores
from patchtrace.sites import Site


def _scores() -> Scores:
    return Scores(torch.tensor([[0.5, -0.25], [0.125, 1.0]]), ("layer", "head"), "head",
                  baselines={"clean": 2.0, "corrupt": -1.0}, extras={"patched": torch.ones(2, 2)})


def _flip_last_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_scores_json_records_the_sha256_of_the_tensor_file(tmp_path):
    d = _scores().save(tmp_path / "r")
    meta = json.loads((d / "scores.json").read_text())
    assert meta["checksums"]["scores.safetensors"] == hashlib.sha256((d / "scores.safetensors").read_bytes()).hexdigest()
    assert len(meta["checksums"]["json"]) == 64
    back = Scores.load(d)
    torch.testing.assert_close(back.values, _scores().values)


@pytest.mark.parametrize("damage", ["flipped bit", "truncated"])
def test_damaged_tensor_file_is_named(tmp_path, damage):
    d = _scores().save(tmp_path / "r")
    t = d / "scores.safetensors"
    if damage == "flipped bit":
        _flip_last_bit(t)
    else:
        t.write_bytes(t.read_bytes()[:40])
    with pytest.raises(ResultsError, match=r"scores\.safetensors: damaged"):
        Scores.load(d)


def test_without_checksums_a_flipped_bit_would_load_silently(tmp_path):
    """Why the checksum is needed: the same damage in a folder without one loads a wrong number."""
    d = _scores().save(tmp_path / "r")
    meta = json.loads((d / "scores.json").read_text())
    del meta["checksums"]
    (d / "scores.json").write_text(json.dumps(meta))  # an older results folder: still readable
    _flip_last_bit(d / "scores.safetensors")
    back = Scores.load(d)
    assert not torch.equal(back.extras["patched"], torch.ones(2, 2)) or not torch.equal(back.values, _scores().values)


def test_edited_or_invalid_json_is_named(tmp_path):
    d = _scores().save(tmp_path / "r")
    meta = json.loads((d / "scores.json").read_text())
    meta["baselines"]["clean"] = 3.0
    (d / "scores.json").write_text(json.dumps(meta))
    with pytest.raises(ResultsError, match=r"scores\.json: damaged or edited"):
        Scores.load(d)
    (d / "scores.json").write_text('{"format_version": 1, "axes": [')
    with pytest.raises(ResultsError, match=r"scores\.json: damaged, not valid JSON"):
        Scores.load(d)
    (d / "scores.json").write_text("[1, 2]")
    with pytest.raises(ResultsError, match="JSON object"):
        Scores.load(d)


def test_missing_field_is_named(tmp_path):
    d = _scores().save(tmp_path / "r")
    meta = json.loads((d / "scores.json").read_text())
    del meta["axes"], meta["checksums"]
    (d / "scores.json").write_text(json.dumps(meta))
    with pytest.raises(ResultsError, match="'axes' is missing"):
        Scores.load(d)


def test_dbm_mask_checksum(tmp_path):
    from patchtrace.methods import dbm

    sites = (Site("head", 0, 1, -1), Site("mlp_out", 0, None, -1))
    mask = dbm.Mask(sites, torch.tensor([0.2, 0.9]), torch.tensor([0.0, 1.0]), (sites[1],), {}, {}, {}, {})
    d = mask.save(tmp_path / "m")
    meta = json.loads((d / "mask.json").read_text())
    assert meta["checksums"]["mask.safetensors"] == hashlib.sha256((d / "mask.safetensors").read_bytes()).hexdigest()
    assert dbm.Mask.load(d).kept == (sites[1],)
    _flip_last_bit(d / "mask.safetensors")
    with pytest.raises(ResultsError, match=r"mask\.safetensors: damaged"):
        dbm.Mask.load(d)


def test_qa_attribution_checksum(tmp_path):
    from patchtrace.qa.attnattrib import Attribution
    from patchtrace.qa.prompts import QAPrompt

    prompt = QAPrompt("A. B. Q?", [1, 2, 3, 4], [(0, 2), (2, 3)], [0, 0, 1, -1])
    a = Attribution([7], " x", torch.tensor([0.1, 0.2, 0.7, 0.0]), torch.tensor([0.3, 0.7]), [1, 0], (2, 3), 0.01,
                    "attnattrib", prompt)
    d = a.save(tmp_path / "a")
    meta = json.loads((d / "attribution.json").read_text())
    assert meta["checksums"]["attribution.safetensors"] == hashlib.sha256(
        (d / "attribution.safetensors").read_bytes()).hexdigest()
    assert Attribution.load(d).ranking == [1, 0]
    _flip_last_bit(d / "attribution.safetensors")
    with pytest.raises(GenerationError, match=r"attribution\.safetensors: damaged"):
        Attribution.load(d)
