"""Scores: save/load round trip, top_k, to_dataframe, and what a results folder holds."""

from __future__ import annotations

import torch

from patchtrace.results import Scores
from patchtrace.sites import Site


def _scores() -> Scores:
    g = torch.Generator().manual_seed(0)
    vals = torch.randn(3, 4, 5, generator=g)
    return Scores(
        values=vals,
        axes=("layer", "head", "pos"),
        site_kind="head",
        value_name="effect",
        metric="logit_diff",
        baselines={"clean": 2.5, "corrupt": -1.25},
        labels={"pos": ["a", "b", "c", "d", "e"], "pos_index": ["0", "1", "2", "3", "4"]},
        per_example=torch.randn(2, 3, 4, 5, generator=g),
        extras={"patched": torch.randn(3, 4, 5, generator=g), "clean_per_example": torch.tensor([1.0, 2.0])},
        provenance={"method": "test", "config": {"a": 1, "b": [1, 2]}, "seeds": {"noise": 0}},
    )


def test_save_load_round_trip(tmp_path):
    s = _scores()
    d = s.save(tmp_path / "run")
    t = Scores.load(d)
    assert torch.equal(t.values, s.values)
    assert t.per_example is not None and torch.equal(t.per_example, s.per_example)
    assert set(t.extras) == set(s.extras)
    for k in s.extras:
        assert torch.equal(t.extras[k], s.extras[k])
    assert t.axes == s.axes and t.site_kind == s.site_kind and t.value_name == s.value_name
    assert t.metric == s.metric and t.baselines == s.baselines and t.labels == s.labels
    assert t.provenance == s.provenance
    # non-vacuity: a different Scores does not compare equal
    assert not torch.equal(Scores.load(_other(tmp_path)).values, s.values)


def _other(tmp_path):
    s = _scores()
    return s.replace(values=s.values + 1).save(tmp_path / "other")


def test_scores_are_frozen():
    import dataclasses

    import pytest

    with pytest.raises(dataclasses.FrozenInstanceError):
        _scores().values = torch.zeros(1)  # type: ignore[misc]


def test_folder_holds_only_json_and_safetensors(tmp_path):
    d = _scores().save(tmp_path / "run")
    files = sorted(p.name for p in d.iterdir())
    assert files == ["scores.json", "scores.safetensors"]
    assert all(p.suffix in (".json", ".safetensors") for p in d.iterdir())


def test_top_k_order_against_hand_built_tensor():
    v = torch.zeros(2, 3)
    v[1, 2] = 5.0
    v[0, 1] = -7.0
    v[1, 0] = 3.0
    v[0, 0] = 1.0
    s = Scores(v, ("layer", "head"), "head", labels={"fixed_pos": ["-1"]})
    top = s.top_k(3)
    assert [x[1] for x in top] == [5.0, 3.0, 1.0]
    assert top[0][0] == Site("head", 1, 2, -1) and top[1][0] == Site("head", 1, 0, -1)
    assert s.top_k(1, by="abs")[0] == (Site("head", 0, 1, -1), -7.0)
    assert s.top_k(1, by="neg")[0][0] == Site("head", 0, 1, -1)
    assert len(s.top_k(100)) == 6


def test_top_k_position_axis_uses_pos_index_labels():
    v = torch.zeros(2, 3)
    v[1, 2] = 1.0
    s = Scores(v, ("layer", "pos"), "resid_pre", labels={"pos_index": ["4", "7", "-1"]})
    assert s.top_k(1)[0][0] == Site("resid_pre", 1, None, -1)


def test_to_dataframe_rows_and_values():
    s = _scores()
    df = s.to_dataframe()
    assert len(df) == 3 * 4 * 5
    row = df[(df["layer"] == 2) & (df["head"] == 1) & (df["pos"] == 3)].iloc[0]
    assert abs(row["effect"] - float(s.values[2, 1, 3])) < 1e-7
    assert abs(row["patched"] - float(s.extras["patched"][2, 1, 3])) < 1e-7
    assert row["site"] == "head[2].h1@3"
    assert abs(df["effect"].sum() - float(s.values.sum())) < 1e-4


def test_non_site_cells_are_named_by_their_axis_names_when_given():
    """Edge grids carry node names (labels['sender_name'] / ['receiver_name']): tables must show them, not the
    bare coordinates; a grid without names keeps the coordinate label."""
    import torch

    from patchtrace.results import Scores

    v = torch.arange(6.0).reshape(2, 3)
    named = Scores(v, ("sender", "receiver"), "edge", "effect", "logit_diff", {},
                   {"sender_name": ["input", "a0.h1"], "receiver_name": ["a1.h0<q>", "m1", "logits"]})
    assert named.cell_label((1, 2)) == "a0.h1 · logits"
    assert named.cell_label((0, 0)) == "input · a1.h0<q>"
    bare = Scores(v, ("sender", "receiver"), "edge", "effect", "logit_diff", {}, {})
    assert "a0.h1" not in bare.cell_label((1, 2)) and bare.cell_label((1, 2)) == bare.grid.label((1, 2))
