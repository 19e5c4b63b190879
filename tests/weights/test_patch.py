"""WeightPatch core: exact reversibility, algebra, quantization bounds, files, and bad input.

References are written out here, independently of the code under test: the expected weights after an
apply are ``(θ.float() + s·Δ).to(dtype)`` computed by hand from a saved copy; quantization bounds come
from the scheme's definition; projection is checked by the dot product with the reference.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from patchtrace.errors import PatchtraceError
from patchtrace.weights import WeightPatch, WeightPatchError, apply_state, base_hash, remove_state


def cnn(seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10)
    )
    return m.to(dtype)


def snapshot(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def bits_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8) if a[k].numel() and a[k].is_floating_point() else a[k],
                                                    b[k].view(torch.uint8) if b[k].numel() and b[k].is_floating_point() else b[k]) for k in a)


def tuned_of(base: dict, scale: float = 0.1, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v for k, v in base.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_matches_hand_sum_and_remove_is_bit_exact(dtype):
    m = cnn(dtype=dtype)
    base = snapshot(m)
    # large deltas against small weights: many elements lose bits in fl(θ+Δ)−Δ, so the receipt matters
    p = WeightPatch.extract(base, tuned_of(base, scale=3.0), select="0.*,4.weight,1.running_mean")
    r = p.apply(m, scale=0.7)
    for n in p.names:
        want = (base[n].float() + p.deltas[n] * 0.7).to(dtype)
        assert torch.equal(m.state_dict()[n], want), n
    assert torch.equal(m.state_dict()["4.bias"], base["4.bias"])  # not selected: untouched
    assert r.n_fixups > 0  # the naive subtraction alone would not be exact here
    p.remove(m, r)
    assert bits_equal(snapshot(m), base)


def test_state_dict_apply_and_remove_and_scoped():
    m = cnn()
    base = snapshot(m)
    p = WeightPatch.extract(base, tuned_of(base, 2.0), select="re:^0\\.")
    new, r = apply_state(p, base)
    assert torch.equal(new["0.weight"], base["0.weight"] + p.deltas["0.weight"])
    assert bits_equal(remove_state(p, new, r), base)
    x = torch.randn(2, 1, 8, 8)
    m.eval()
    with p.applied(m):
        inside = m(x)
        assert torch.equal(m[0].weight, new["0.weight"])
    assert bits_equal(snapshot(m), base)
    m2 = cnn()
    m2.load_state_dict(new)
    m2.eval()
    assert torch.equal(inside, m2(x))


def test_remove_refuses_a_model_changed_since_apply():
    m = cnn()
    base = snapshot(m)
    p = WeightPatch.extract(base, tuned_of(base), select="0.weight")
    r = p.apply(m)
    with torch.no_grad():
        m[0].weight[0, 0, 0, 0] += 1
    with pytest.raises(WeightPatchError, match=r"changed since the apply"):
        p.remove(m, r)


def test_compose_equals_sequential_applies():
    base = snapshot(cnn())
    # dyadic values (multiples of 1/64, small) make every float sum exact, so equality is exact
    g = torch.Generator().manual_seed(3)
    dy = {k: v for k, v in base.items()}
    dy = {k: (torch.randint(-64, 64, v.shape, generator=g) / 64).to(v.dtype) if v.is_floating_point() else v for k, v in dy.items()}
    t1 = {k: (v + torch.randint(-8, 8, v.shape, generator=g) / 64) if v.is_floating_point() else v for k, v in dy.items()}
    t2 = {k: (v + torch.randint(-8, 8, v.shape, generator=g) / 32) if v.is_floating_point() else v for k, v in dy.items()}
    p1 = WeightPatch.extract(dy, t1, select="0.*")
    p2 = WeightPatch.extract(dy, t2, select="0.weight,4.*")
    both = WeightPatch.compose([p1, p2], weights=[0.5, 2.0])
    seq, _ = apply_state(p1.scaled(0.5), dy)
    seq, _ = apply_state(p2.scaled(2.0), seq, allow_other_base=True)
    once, _ = apply_state(both, dy)
    assert set(both.names) == {"0.weight", "0.bias", "4.weight", "4.bias"}
    assert bits_equal(once, seq)
    # random values: equal up to float rounding
    r1 = WeightPatch.extract(base, tuned_of(base, 0.1, 5), select="0.*")
    r2 = WeightPatch.extract(base, tuned_of(base, 0.1, 6), select="0.*")
    a, _ = apply_state(WeightPatch.compose([r1, r2]), base)
    b, _ = apply_state(r1, base)
    b, _ = apply_state(r2, b, allow_other_base=True)
    for n in r1.names:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6)


def test_projection_leaves_each_tensor_orthogonal_to_the_reference():
    base = snapshot(cnn())
    p = WeightPatch.extract(base, tuned_of(base, 0.1, 1), select="0.*,4.*")
    ref = WeightPatch.extract(base, tuned_of(base, 0.1, 2), select="0.*,4.*")
    out = p.project_out(ref)
    for n in p.names:
        v, r, o = p.deltas[n].double().flatten(), ref.deltas[n].double().flatten(), out.deltas[n].double().flatten()
        assert abs(float(o @ r)) / (float(o.norm()) * float(r.norm())) < 1e-6, n
        assert abs(float(v @ r)) / (float(v.norm()) * float(r.norm())) > 1e-3, n  # there was something to remove
        # what was removed is parallel to the reference
        removed = v - o
        cos = float(removed @ r) / (float(removed.norm()) * float(r.norm()))
        assert abs(abs(cos) - 1) < 1e-6
    with pytest.raises(WeightPatchError, match=r"'4.weight'"):
        p.project_out(ref.select("0.*"))


@pytest.mark.parametrize("levels", [2, 5, 16, 255])
def test_quantization_error_bounds_per_scheme(levels):
    g = torch.Generator().manual_seed(levels)
    v = torch.randn(2000, generator=g) * 0.05
    v[::11] = 0.0
    base = {"w": torch.zeros(2000)}
    p = WeightPatch.extract(base, {"w": v}, select="w")
    d = p.deltas["w"].double()
    # linear: half a grid step
    q = p.quantize(levels, "linear").deltas["w"].double()
    step = (float(d.max()) - float(d.min())) / (levels - 1)
    assert float((q - d).abs().max()) <= step / 2 * (1 + 1e-6) + 1e-7
    assert len(torch.unique(q)) <= levels
    # tanh: half a grid step in tanh space
    q = p.quantize(levels, "tanh").deltas["w"].double()
    t = torch.tanh(d)
    step = (float(t.max()) - float(t.min())) / (levels - 1)
    assert float((torch.tanh(q) - t).abs().max()) <= step / 2 * (1 + 1e-5) + 1e-7
    if levels >= 5:
        # log: zeros exact, signs kept, |log2|q| − log2|v|| ≤ half a step of the magnitude grid
        q = p.quantize(levels, "log").deltas["w"].double()
        m = (levels - 1) // 2
        nz = d != 0
        assert torch.equal(q[~nz], d[~nz]) and torch.equal(torch.sign(q[nz]), torch.sign(d[nz]))
        lg = torch.log2(d[nz].abs())
        step = (float(lg.max()) - float(lg.min())) / (m - 1)
        assert float((torch.log2(q[nz].abs()) - lg).abs().max()) <= step / 2 * (1 + 1e-5) + 1e-6
        assert len(torch.unique(q)) <= levels


def test_quantized_bytes_and_file_round_trip(tmp_path):
    base = snapshot(cnn())
    p = WeightPatch.extract(base, tuned_of(base), select="0.*,4.*")
    q = p.quantize(16, "linear")
    # 4 bits per value instead of 32, plus 16 bytes of range per tensor
    assert q.nbytes == sum(math.ceil(d.numel() * 4 / 8) + 16 for d in p.deltas.values())
    assert p.nbytes == 4 * p.numel
    for pp in (p, q, p.quantize(7, "log"), p.quantize(300, "tanh")):
        pp.save(tmp_path / "x")
        back = WeightPatch.load(tmp_path / "x")
        assert back.names == pp.names and back.base_hash == pp.base_hash and back.arch == pp.arch
        assert all(torch.equal(back.deltas[n], pp.deltas[n]) for n in pp.names)
        assert back.nbytes == pp.nbytes


def test_tampered_truncated_or_edited_files_are_refused(tmp_path):
    base = snapshot(cnn())
    p = WeightPatch.extract(base, tuned_of(base), select="0.*")
    d = p.save(tmp_path / "p")
    st = d / "patch.safetensors"
    raw = st.read_bytes()
    st.write_bytes(raw[:-7])
    with pytest.raises(WeightPatchError, match=r"patch.safetensors.*truncated or was modified"):
        WeightPatch.load(d)
    flipped = bytearray(raw)
    flipped[-3] ^= 1
    st.write_bytes(bytes(flipped))
    with pytest.raises(WeightPatchError, match=r"checksum"):
        WeightPatch.load(d)
    st.write_bytes(raw)
    meta = json.loads((d / "patch.json").read_text())
    meta["base_hash"] = "0" * 16
    (d / "patch.json").write_text(json.dumps(meta))
    with pytest.raises(WeightPatchError, match=r"patch.json.*edited"):
        WeightPatch.load(d)
    (d / "patch.json").write_text("{not json")
    with pytest.raises(WeightPatchError, match=r"not valid JSON"):
        WeightPatch.load(d)
    with pytest.raises(WeightPatchError, match=r"not a weight-patch folder"):
        WeightPatch.load(tmp_path / "nothing")


def test_failed_apply_leaves_model_untouched_and_names_the_item():
    m = cnn()
    base = snapshot(m)
    p = WeightPatch.extract(base, tuned_of(base), select="0.weight,4.weight")
    # another base of the same architecture: refused by hash, allowed with the override
    other = cnn(seed=9)
    other_base = snapshot(other)
    with pytest.raises(WeightPatchError, match=f"weights hash is {base_hash(other)}.*allow_other_base"):
        p.apply(other)
    assert bits_equal(snapshot(other), other_base)
    r = p.apply(other, allow_other_base=True)
    p.remove(other, r)
    assert bits_equal(snapshot(other), other_base)
    # overflow in the second tensor only: nothing may change, not even the first tensor
    huge = WeightPatch({"0.weight": torch.ones(4, 1, 3, 3), "4.weight": torch.full((10, 144), 3e38)}, p.arch, p.base_hash)
    with pytest.raises(WeightPatchError, match=r"'4.weight'.*NaN/Inf"):
        huge.apply(m, scale=2.0)
    assert bits_equal(snapshot(m), base)
    # another architecture: the first differing tensor is named
    wide = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 12))
    with pytest.raises(WeightPatchError, match=r"'4.weight'.*shape"):
        p.apply(wide, allow_other_base=True)
    tiny = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3))
    with pytest.raises(WeightPatchError, match=r"no tensor '4.weight'"):
        p.apply(tiny, allow_other_base=True)
    assert bits_equal(snapshot(m), base)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p, b: p.quantize(1, "linear"), "levels 1"),
        (lambda p, b: p.quantize(2, "log"), "need ≥ 3"),
        (lambda p, b: p.quantize(8, "cubic"), "scheme 'cubic'"),
        (lambda p, b: WeightPatch.extract(b, b, select="conv9.*"), "selector 'conv9.*' matches no"),
        (lambda p, b: WeightPatch.extract(b, {**b, "0.weight": b["0.weight"] * float("nan")}, select="0.*"), "'0.weight'.*NaN"),
        (lambda p, b: WeightPatch.extract(b, {k: v for k, v in b.items() if k != "4.bias"}), "no tensor '4.bias'"),
        (lambda p, b: WeightPatch.compose([p, p.for_base("f" * 16)]), "patch 1 has base"),
        (lambda p, b: p.scaled(float("inf")), "finite"),
    ],
)
def test_bad_input_is_a_patchtrace_error_naming_the_item(make, match):
    base = snapshot(cnn())
    p = WeightPatch.extract(base, tuned_of(base), select="0.*")
    with pytest.raises(PatchtraceError, match=match):
        make(p, base)


def test_hf_causal_lm_tied_weights_and_saved_file_agree(tmp_path):
    """An HF model (tied embedding) and the folder ``save_pretrained`` writes have the same names and hash."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from patchtrace.weights.io import load_tensors

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=100, tie_word_embeddings=True)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert base_hash(hf) == base_hash(load_tensors(tmp_path))
    tuned = {k: v + 0.01 for k, v in load_tensors(tmp_path).items()}
    p = WeightPatch.extract(hf, tuned, select=[1])
    assert p.names and all(n.startswith("model.layers.1.") for n in p.names)
    before = snapshot(hf)
    ids = torch.tensor([[1, 2, 3]])
    clean = hf(ids).logits
    r = p.apply(hf)
    assert not torch.allclose(hf(ids).logits, clean)
    p.remove(hf, r)
    assert bits_equal(snapshot(hf), before)
