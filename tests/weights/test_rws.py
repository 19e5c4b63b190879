"""The RWS pipeline on a tiny, fast configuration (same code as ``benchmarks/rws.py``).

The signature is checked against the paper's formula written out here in float64 from the returned
checkpoints; the observations are checked where they are large enough not to hinge on numerics.
"""

from __future__ import annotations

import pytest
import torch

from patchtrace.weights import WeightPatchError, apply_state
from patchtrace.weights.digits import corrupt, corruptions, register_corruption
from patchtrace.weights.rws import RWSConfig, run_rws, signature, train_checkpoints


@pytest.fixture(scope="module")
def tiny():
    cfg = RWSConfig(corruptions=("gaussian_noise", "contrast"), width=8, pretrain_size=400, split_size=250,
                    pretrain_epochs=10, finetune_epochs=5, seeds=(0,), quant_grid=(("linear", 16),), alphas=(0.0, 1.0))
    ck = train_checkpoints(cfg)
    return cfg, ck, run_rws(cfg, ck=ck)


def test_signature_is_the_projected_robust_delta_on_the_kept_layers(tiny):
    _cfg, ck, _ = tiny
    p = signature(ck, "A", 0, "contrast", ("conv1", "conv2"))
    assert sorted(p.names) == ["conv1.bias", "conv1.weight", "conv2.bias", "conv2.weight"]
    t0, std, rob = ck.theta0, ck.clean[("A", 0)], ck.robust[("A", 0, "contrast")]
    patched, _ = apply_state(p, std)
    for n in std:
        if n in p.names:
            d = (rob[n].double() - t0[n].double()).flatten()
            r = (std[n].double() - t0[n].double()).flatten()
            want = (std[n].double().flatten() + d - (d @ r) / (r @ r) * r).reshape(std[n].shape)
            torch.testing.assert_close(patched[n].double(), want, rtol=0, atol=1e-6)
        else:
            assert torch.equal(patched[n], std[n]), n


def test_tiny_pipeline_observations(tiny):
    _cfg, _, r = tiny
    acc = r.accuracy
    # the robust fine-tune learned something about its corruption, and the patch carries it over
    assert acc["robust:contrast"]["contrast"] > acc["clean"]["contrast"] + 0.05
    gain = acc["clean+RWS:contrast"]["contrast"] - acc["clean"]["contrast"]
    assert gain > 0.5 * (acc["robust:contrast"]["contrast"] - acc["clean"]["contrast"])
    assert acc["clean+RWS:contrast"]["clean"] > acc["robust:contrast"]["clean"] - 0.02
    # discriminative signatures: the same corruption on another split agrees more than another corruption
    s = r.similarity
    m = torch.tensor(s["matrix"])
    assert torch.allclose(m, m.T) and torch.allclose(m.diagonal(), torch.ones(len(m)), atol=1e-9)
    assert s["summary"]["within"] > s["summary"]["across"] + 0.2
    # quantized signature: 16 levels = 4 bits/value, and it still patches
    q = next(row for row in r.quant if row["scheme"] == "linear")
    assert r.bytes["signature_quantized"] < r.bytes["signature_float32"] / 6
    assert q["corrupted"] > r.quant[0]["corrupted"] - 0.03
    # alpha = 0 is the clean model; removal is exact
    assert r.alpha["contrast"][0][2] == pytest.approx(acc["clean"]["contrast"])
    assert r.removed_exact
    assert set(r.layer_norms) == {"conv1", "conv2", "conv3", "fc1", "fc2"}


@pytest.fixture()
def clean_registry():
    from patchtrace.weights import digits

    saved = dict(digits._CORRUPTIONS)
    yield
    digits._CORRUPTIONS.clear()
    digits._CORRUPTIONS.update(saved)


def test_corruptions_are_registrable_and_checked(clean_registry):
    register_corruption("test_invert", lambda x, g: 1 - x, replace=True)
    x = torch.rand(3, 1, 8, 8)
    assert "test_invert" in corruptions() and torch.equal(corrupt(x, "test_invert", 0), 1 - x)
    register_corruption("test_bad", lambda x, g: x[:1], replace=True)
    with pytest.raises(WeightPatchError, match="'test_bad' must return"):
        corrupt(x, "test_bad", 0)
    with pytest.raises(WeightPatchError, match="already registered"):
        register_corruption("blur", lambda x, g: x)
    with pytest.raises(WeightPatchError, match="unknown corruption 'fog'"):
        RWSConfig(corruptions=("fog",))
    with pytest.raises(WeightPatchError, match="keep"):
        RWSConfig(keep=("conv9",))
