"""Text in images (issue 13): editing from t_start, prevention's closed form, localized LoRA, joint textloc.

References are written here independently: a module-forward wrapper gated by a call counter on the
UNet (not hooks on the projections), a plain least-squares solve of the augmented system, the K/V
outputs of the edited projections themselves, and parameter counts by hand.
"""

from __future__ import annotations

import pytest
import torch

from patchtrace.diffusion.adapters import DiffusionError, T2IAdapter
from patchtrace.diffusion.textedit import check_t_start, glyph_pairs, patched_images

A, B = ["a red two on a white background"], ["a red seven on a white background"]


def _naive_from_step(sd, layer_name, states_b, t_start, prompt_a, lat, steps=3):
    """Reference: wrap the attn2 module's forward; swap its encoder states (conditional half) from call t_start."""
    unet, mod = sd.unet, dict(sd.unet.named_modules())[layer_name]
    count = [-1]
    orig_unet, orig_mod = unet.forward, mod.forward

    def unet_fwd(*a, **k):
        count[0] += 1
        return orig_unet(*a, **k)

    def mod_fwd(hidden_states, encoder_hidden_states=None, **k):
        if count[0] >= t_start:
            ehs = encoder_hidden_states.clone()
            ehs[ehs.shape[0] // 2 :] = states_b
            encoder_hidden_states = ehs
        return orig_mod(hidden_states, encoder_hidden_states=encoder_hidden_states, **k)

    unet.forward, mod.forward = unet_fwd, mod_fwd
    try:
        pos, neg = sd.encode_prompt(prompt_a, "cpu", 1, True)
        with torch.no_grad():
            return sd(prompt_embeds=pos, negative_prompt_embeds=neg, latents=lat, num_inference_steps=steps,
                      guidance_scale=3.0, output_type="pt").images  # fmt: skip
    finally:
        del unet.forward, mod.forward


def test_edit_from_t_start_matches_naive(sd):
    a = T2IAdapter(sd, steps=3)
    lat = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * sd.scheduler.init_noise_sigma
    states_b, _ = sd.encode_prompt(B, "cpu", 1, True)
    name = a.layers[3].name
    ours = patched_images(sd, A, B, [3], t_start=1, seeds=[0], steps=3)
    ref = _naive_from_step(sd, name, states_b, 1, A, lat)
    assert torch.allclose(ours, ref, atol=1e-5)
    from_0 = patched_images(sd, A, B, [3], t_start=0, seeds=[0], steps=3)
    plain = patched_images(sd, A, A, [], t_start=0, seeds=[0], steps=3)
    assert not torch.allclose(ours, from_0, atol=1e-4)  # the start step matters
    assert not torch.allclose(ours, plain, atol=1e-4)
    assert torch.allclose(from_0, _naive_from_step(sd, name, states_b, 0, A, lat), atol=1e-5)


def test_edit_refusals(sd):
    with pytest.raises(DiffusionError, match="t_start 3 is beyond the scheduler's 3 steps"):
        check_t_start(3, 3)
    with pytest.raises(DiffusionError, match="t_start -1"):
        patched_images(sd, A, B, [3], t_start=-1, seeds=[0], steps=3)
    with pytest.raises(DiffusionError, match="layer 9 does not exist"):
        patched_images(sd, A, B, [9], t_start=0, seeds=[0], steps=3)
    with pytest.raises(DiffusionError, match="no value 'nine'"):
        glyph_pairs("two", "nine", 2)
    pa, pb, specs = glyph_pairs("two", "seven", 3)
    assert [" ".join("two" if w == "seven" else w for w in p.split()) for p in pb] == pa
    assert all(s.glyph == "two" for s in specs)


def test_closed_form_against_lstsq():
    from patchtrace.diffusion.locoedit import solve

    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 5, generator=g, dtype=torch.float64)
    X, Y = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    lam = 0.3
    # min ||X Wᵀ - Y W_oldᵀ||² + lam ||Wᵀ - W_oldᵀ||²  ==  lstsq of the stacked system
    lhs = torch.cat([X, lam**0.5 * torch.eye(5, dtype=torch.float64)])
    rhs = torch.cat([Y @ W.T, lam**0.5 * W.T])
    ref = torch.linalg.lstsq(lhs, rhs).solution.T
    assert torch.allclose(solve(W, X, Y, lam), ref, atol=1e-10)


def test_prevention_on_tiny_pipeline_by_kv(sd):
    from patchtrace.diffusion.prevent import FIT_TEMPLATES, prevention_patch, prompt_sets

    a = T2IAdapter(sd, steps=1)
    patch = prevention_patch(a, [1], "two", "seven", lam=0.01, per_template=3)
    to_k = a.layers[1].to_k
    forb, twins, others, _, _ = prompt_sets("two", "seven", FIT_TEMPLATES, 0, 3)
    enc = lambda ps: sd.encode_prompt(ps, "cpu", 1, False)[0].reshape(-1, 16)  # noqa: E731
    xf, yf, xo = enc(forb), enc(twins), enc(others)
    # the weights are the lstsq solution of the stacked system, solved here from the pipeline's own encodings
    w_old = to_k.weight.detach().double()
    X, Y = torch.cat([xf, xo]).double(), torch.cat([yf, xo]).double()
    lhs = torch.cat([X, 0.1 * torch.eye(16, dtype=torch.float64)])
    rhs = torch.cat([Y @ w_old.T, 0.1 * w_old.T])
    ref = torch.linalg.lstsq(lhs, rhs).solution.T.float()
    with torch.no_grad():
        k_forb_before, k_twin, k_other_before = to_k(xf), to_k(yf), to_k(xo)
        with patch.applied(sd.unet):
            assert torch.allclose(to_k.weight, ref, atol=1e-4)
            k_forb_after, k_other_after = to_k(xf), to_k(xo)
    err_before = (k_forb_before - k_twin).norm()
    err_after = (k_forb_after - k_twin).norm()
    assert err_after < 0.5 * err_before  # forbidden prompts now give (close to) the neutral twins' keys
    assert (k_other_after - k_other_before).norm() < (k_forb_after - k_forb_before).norm()
    assert set(patch.names) == {f"{a.layers[1].name}.to_k.weight", f"{a.layers[1].name}.to_v.weight"}
    assert torch.equal(to_k.weight, w_old.float())  # restored exactly


def test_prevention_refusals(sd):
    from patchtrace.diffusion.prevent import prevention_patch

    a = T2IAdapter(sd, steps=1)
    with pytest.raises(DiffusionError, match="'x' is 2 tokens and neutral 'two' is 1"):
        prevention_patch(a, [1], "x", "two")
    with pytest.raises(DiffusionError, match="both 'two'"):
        prevention_patch(a, [1], "two", "two")
    with pytest.raises(DiffusionError, match="layer 8 does not exist"):
        prevention_patch(a, [8], "two", "seven")


def test_lora_modules_and_counts():
    from patchtrace.diffusion.small.pipeline import random_small
    from patchtrace.diffusion.small.scorer import load_scorer
    from patchtrace.diffusion.textlora import lora_modules, text_lora

    pipe = random_small()
    a = T2IAdapter(pipe, steps=1)
    loc = lora_modules(a, "localized", [5])
    assert loc == [f"{a.layers[5].name}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
    everything = lora_modules(a, "all")
    assert set(loc) < set(everything) and len(everything) == 4 * 2 * 7  # attn1 + attn2 in 7 transformer blocks
    mods = dict(pipe.unet.named_modules())
    by_hand = sum(4 * (mods[n].in_features + mods[n].out_features) for n in loc)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    r = text_lora(a, load_scorer(), "localized", [5], steps=1, batch=2, rank=4, seeds=[0], n_eval=1)
    assert r["trainable"] == by_hand
    assert set(r["patch"].names) == {n + ".weight" for n in loc}
    after = pipe.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(DiffusionError, match="arm 'some'"):
        lora_modules(a, "some")
    with pytest.raises(DiffusionError, match="needs the localized layers"):
        lora_modules(a, "localized", [])
