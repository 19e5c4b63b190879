"""SD3 joint attention: text-stream K/V patching per layer and timestep against a hand-written processor."""

from __future__ import annotations

import pytest
import torch

from patchtrace.diffusion.adapters import DiffusionError
from patchtrace.diffusion.joint import joint_layers, patch_text_kv, record_text_kv, text_patch_generate

A, B = ["a red two on a white background"], ["a blue seven on a black background"]
KW = {"height": 16, "width": 16, "max_sequence_length": 16}


@pytest.fixture(scope="module")
def sd3():
    from patchtrace.diffusion.tiny import tiny_sd3

    return tiny_sd3()


class NaiveJoint:
    """Joint attention written out (softmax of explicit scores); optionally overrides text K/V of the
    conditional rows from a per-step table, and records the text K/V it computed."""

    def __init__(self, step, override=None):
        self.step, self.override, self.seen = step, override, {}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        b, n_img = hidden_states.shape[:2]
        h = attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        tq, tk, tv = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                      attn.add_v_proj(encoder_hidden_states))  # fmt: skip
        self.seen[self.step[0]] = (tk.clone(), tv.clone())
        if self.override is not None and self.step[0] in self.override:
            ok, ov = self.override[self.step[0]]
            tk, tv = tk.clone(), tv.clone()
            tk[b // 2 :], tv[b // 2 :] = ok[b // 2 :], ov[b // 2 :]

        def heads(x):
            return x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2)

        Q, K, V = (heads(torch.cat(p, 1)) for p in ((q, tq), (k, tk), (v, tv)))
        w = (Q @ K.transpose(-1, -2) / Q.shape[-1] ** 0.5).softmax(-1)
        out = (w @ V).transpose(1, 2).reshape(b, -1, attn.heads * Q.shape[-1])
        img, txt = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return attn.to_out[1](attn.to_out[0](img)), txt


def _with_processor(pipe, layer, proc):
    attn = pipe.transformer.transformer_blocks[layer].attn
    old = attn.processor
    attn.processor = proc
    return attn, old


def _gen(pipe, prompt, lat):
    return pipe(prompt=prompt, num_inference_steps=3, guidance_scale=3.0, output_type="pt", latents=lat, **KW).images


def test_layers_and_reference_processor(sd3):
    layers = joint_layers(sd3)
    assert [la.name for la in layers] == [f"transformer_blocks.{i}.attn" for i in range(3)]
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = _gen(sd3, A, lat)
    step = [-1]
    h = sd3.transformer.register_forward_pre_hook(lambda m, a: step.__setitem__(0, step[0] + 1))
    attn, old = _with_processor(sd3, 1, NaiveJoint(step))
    try:
        ref = _gen(sd3, A, lat)
    finally:
        attn.processor, _ = old, h.remove()
    assert torch.allclose(plain, ref, atol=1e-5)  # the hand-written processor is joint attention


def test_patch_matches_naive_reference(sd3):
    layers = joint_layers(sd3)
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = text_patch_generate(sd3, A, B, [1], t_start=1, steps=3, guidance=3.0, latents=lat, **KW)
    step = [-1]
    h = sd3.transformer.register_forward_pre_hook(lambda m, a: step.__setitem__(0, step[0] + 1))
    rec = NaiveJoint(step)
    attn, old = _with_processor(sd3, 1, rec)
    try:
        _gen(sd3, B, lat)  # B-run: record layer 1's text K/V per step
        step[0] = -1
        attn.processor = NaiveJoint(step, override={s: kv for s, kv in rec.seen.items() if s >= 1})
        ref = _gen(sd3, A, lat)
    finally:
        attn.processor, _ = old, h.remove()
    plain = _gen(sd3, A, lat)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-4)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in sd3.transformer.modules()) == 0
    del layers


def test_same_prompt_everywhere_is_bit_exact(sd3):
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = text_patch_generate(sd3, A, A, [0, 1, 2], t_start=0, steps=3, guidance=3.0, latents=lat, **KW)
    assert torch.equal(ours, _gen(sd3, A, lat))


def test_cache_is_per_layer_and_step(sd3):
    layers = joint_layers(sd3)
    with torch.no_grad(), record_text_kv(sd3, layers) as cache:
        _gen(sd3, B, torch.randn(1, 4, 8, 8))
    assert set(cache) == {(j, s, w) for j in range(3) for s in range(3) for w in "kv"}
    assert not torch.equal(cache[(0, 0, "k")], cache[(0, 2, "k")])  # the text stream changes with the step


def test_refusals(sd3, sd):
    lat = torch.randn(1, 4, 8, 8)
    with pytest.raises(DiffusionError, match="t_start 3 is beyond the scheduler's 3 steps"):
        text_patch_generate(sd3, A, B, [1], t_start=3, steps=3, guidance=3.0, latents=lat, **KW)
    with pytest.raises(DiffusionError, match="StableDiffusionPipeline"):
        joint_layers(sd)
    with pytest.raises(DiffusionError, match="layer 5 does not exist"), patch_text_kv(sd3, joint_layers(sd3), {}, [5], 0, 1):
        pass
