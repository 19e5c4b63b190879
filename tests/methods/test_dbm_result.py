"""The Mask result type: per-kind Scores views laid out on the model's grid, a folder that
``patchtrace show``/``report`` read, and masks saved before the type existed still loading."""

from __future__ import annotations

import json

import pytest
import torch

from patchtrace.methods import dbm
from patchtrace.report import find_results
from patchtrace.results import ResultsError, Scores
from patchtrace.sites import Site


def _mask() -> dbm.Mask:
    heads = [Site("head", layer, h, -1) for layer in (3, 5) for h in (0, 2)]
    mlps = [Site("mlp_out", layer, None, -1) for layer in (3, 5)]
    sites = tuple(heads + mlps)
    values = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.7, 0.0])
    binary = (values > 0.5).float()
    ev = {"accuracy": 0.75, "unpatched_accuracy": 0.25, "topk_accuracy": 0.5}
    return dbm.Mask(sites, values, binary, (sites[1], sites[4]), ev, {"loss": torch.tensor([2.0, 1.0])},
                    {"lam": 0.1}, {"method": "dbm"}, ("head", "mlp_out"), torch.arange(6.0))


def test_views_put_each_component_at_its_model_index():
    views = _mask().to_scores()
    assert set(views) == {"head", "mlp_out"}
    h = views["head"]
    assert h.axes == ("layer", "head") and h.labels["layer_index"] == ["3", "5"] and h.labels["head_index"] == ["0", "2"]
    torch.testing.assert_close(h.values, torch.tensor([[0.1, 0.9], [0.2, 0.3]]))
    assert h.extras["binary"].tolist() == [[0.0, 1.0], [0.0, 0.0]]
    assert h.extras["baseline_score"].tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert h.top_k(1)[0] == (Site("head", 3, 2, -1), pytest.approx(0.9))
    m = views["mlp_out"]
    assert m.axes == ("layer",) and m.values.tolist() == pytest.approx([0.7, 0.0])
    assert m.baselines == {"unpatched": 0.25, "mask": 0.75, "top_k": 0.5} and m.value_name == "mask"


def test_saved_folder_is_a_mask_and_a_results_folder(tmp_path):
    mask = _mask()
    mask.save(tmp_path / "m")
    assert set(find_results(tmp_path / "m")) == {"head", "mlp_out"}
    back = dbm.Mask.load(tmp_path / "m")
    assert back.sites == mask.sites and back.kept == mask.kept and back.specs == mask.specs
    torch.testing.assert_close(back.history["loss"], mask.history["loss"])
    torch.testing.assert_close(back.baseline_score, mask.baseline_score)
    assert "2 of 6 components kept" in repr(back)
    # saving a mask of other kinds over it leaves no stale view behind
    only_mlp = dbm.Mask(mask.sites[4:], mask.mask[4:], mask.binary[4:], (mask.sites[4],), {}, {}, {}, {})
    only_mlp.save(tmp_path / "m")
    assert set(find_results(tmp_path / "m")) == {"mlp_out"}
    meta = json.loads((tmp_path / "m" / "mask.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "m" / "mask.json").write_text(json.dumps(meta))
    with pytest.raises(ResultsError, match="format version 99"):
        dbm.Mask.load(tmp_path / "m")
    with pytest.raises(ResultsError, match="not a DBM mask folder"):
        dbm.Mask.load(tmp_path / "nothing")


def test_a_mask_saved_as_scores_before_the_type_existed_still_loads(tmp_path):
    prov = {"method": "dbm", "components": ["head[0].h1@-1", "mlp_out[0]@-1"], "kept": ["mlp_out[0]@-1"],
            "evaluation": {"accuracy": 1.0}, "config": {"lam": 0.2}}
    extras = {"mask": torch.tensor([0.2, 0.8]), "binary": torch.tensor([0.0, 1.0]), "history.loss": torch.tensor([3.0])}
    Scores(torch.tensor([0.2]), ("layer",), "head", value_name="mask", extras=extras, provenance=prov).save(tmp_path / "old")
    m = dbm.Mask.load(tmp_path / "old")
    assert m.sites == (Site("head", 0, 1, -1), Site("mlp_out", 0, None, -1)) and m.kept == (Site("mlp_out", 0, None, -1),)
    assert m.evaluation == {"accuracy": 1.0} and m.config == {"lam": 0.2} and m.history["loss"].tolist() == [3.0]
