"""The small joint-attention model's plumbing and per-layer text localization, and the text commands' refusals."""

from __future__ import annotations

import torch
from test_joint import NaiveJoint
from typer.testing import CliRunner

from patchtrace.cli import build_app

A, B = ["a red two on a white background"], ["a red seven on a white background"]


def test_joint_textloc_matches_naive_processor():
    from patchtrace.diffusion.joint import joint_layers
    from patchtrace.diffusion.smalljoint.pipeline import random_small_joint
    from patchtrace.diffusion.textloc import joint_fractions, joint_text_localization

    pipe = random_small_joint()
    layers = joint_layers(pipe)
    assert len(layers) == 6 and layers[0].name == "transformer_blocks.0.attn"
    green = lambda im, i: im[:, 1].mean((1, 2))  # noqa: E731
    r = joint_text_localization(pipe, A, B, green, seeds=[0], steps=2, pooled_with=[[4]])
    lat = torch.randn((3, 16, 16), generator=torch.Generator().manual_seed(0))[None]
    step = [-1]
    h = pipe.transformer.register_forward_pre_hook(lambda m, a, k: step.__setitem__(0, step[0] + 1), with_kwargs=True)
    attn = pipe.transformer.transformer_blocks[4].attn
    old = attn.processor
    try:
        rec = NaiveJoint(step)
        attn.processor = rec
        pipe(B, num_inference_steps=2, guidance_scale=3.0, latents=lat)  # B-run: record layer 4
        step[0] = -1
        attn.processor = NaiveJoint(step, override=dict(rec.seen))
        ref = pipe(A, num_inference_steps=2, guidance_scale=3.0, latents=lat).images
    finally:
        attn.processor = old
        h.remove()
    assert torch.allclose(r["images"][4], ref, atol=1e-5)
    assert not torch.allclose(r["images"][4], r["images_a"], atol=1e-4)
    assert float(r["agree_b"][4]) == float(green(ref, None).mean())
    assert r["labels"][-3:] == ["all", "pooled", "pooled+L4"]
    orig = pipe.encode  # reference for "pooled": A's text tokens with B's pooled embedding, by the encoder itself

    def enc(prompts):
        h, p = orig(prompts)
        return (h, orig(B)[1]) if prompts == A else (h, p)

    pipe.encode = enc
    try:
        ref_pooled = pipe(A, num_inference_steps=2, guidance_scale=3.0, latents=lat).images
        step[0] = -1  # "pooled+L4": the encoder's B pooled embedding and the naive processor fed B's layer-4 K/V
        h = pipe.transformer.register_forward_pre_hook(lambda m, a, k: step.__setitem__(0, step[0] + 1), with_kwargs=True)
        attn.processor = NaiveJoint(step, override=dict(rec.seen))
        ref_both = pipe(A, num_inference_steps=2, guidance_scale=3.0, latents=lat).images
    finally:
        del pipe.encode
        attn.processor = old
        h.remove()
    assert torch.allclose(r["images"][-2], ref_pooled, atol=1e-5)
    assert not torch.allclose(r["images"][-2], r["images_a"], atol=1e-4)
    assert torch.allclose(r["images"][-1], ref_both, atol=1e-5)
    assert not torch.allclose(ref_both, ref_pooled, atol=1e-4) and not torch.allclose(ref_both, ref, atol=1e-4)
    kv, whole = joint_fractions(pipe, [4])
    total = sum(p.numel() for p in pipe.transformer.parameters())
    assert kv == 2 * (64 * 64 + 64) / total and whole > kv  # add_k_proj + add_v_proj: 64 -> 64 with bias
    # the pooled text projection: linear_1 64 -> 64 and linear_2 64 -> 64 (inner width 64), with biases
    assert joint_fractions(pipe, [], pooled=True) == (2 * (64 * 64 + 64) / total,) * 2
    assert joint_fractions(pipe, [4], pooled=True)[0] == 2 * kv


def test_text_commands_refuse_bad_input(tmp_path):
    app = build_app()
    r = CliRunner().invoke(app, ["t2i", "text-edit", "--layers", "5", "--t-starts", "0,12", "--steps", "10",
                                 "--out", str(tmp_path / "e")])  # fmt: skip
    assert r.exit_code == 2 and "t_start 12 is beyond the scheduler's 10 steps" in r.output
    r = CliRunner().invoke(app, ["t2i", "text-edit", "--glyph-b", "nine", "--layers", "5", "--out", str(tmp_path / "g")])
    assert r.exit_code == 2 and "has no value 'nine'" in r.output
    r = CliRunner().invoke(app, ["t2i", "textloc", "--pipeline", "if", "--out", str(tmp_path / "i")])
    assert r.exit_code == 2 and "DeepFloyd IF" in r.output and "not supported" in r.output
    r = CliRunner().invoke(app, ["t2i", "prevent", "--forbidden", "x", "--neutral", "two", "--layers", "5",
                                 "--out", str(tmp_path / "p")])  # fmt: skip
    assert r.exit_code == 2 and "same token length" in r.output
    r = CliRunner().invoke(app, ["t2i", "text-lora", "--layers", "9", "--out", str(tmp_path / "l")])
    assert r.exit_code == 2 and "layer 9 does not exist" in r.output
    for cmd in ("textloc", "text-edit", "prevent", "text-lora"):
        assert not (tmp_path / cmd).exists()


def test_deepfloyd_if_is_refused_by_name():
    import pytest

    from patchtrace.diffusion.adapters import DiffusionError
    from patchtrace.diffusion.joint import joint_layers

    IFPipeline = type("IFPipeline", (), {})
    with pytest.raises(DiffusionError, match="DeepFloyd IF's added-KV attention is not supported"):
        joint_layers(IFPipeline())


def test_joint_lora_modules_and_restore():
    from patchtrace.diffusion.small.scorer import load_scorer
    from patchtrace.diffusion.smalljoint.pipeline import random_small_joint
    from patchtrace.diffusion.textlora import lora_modules, text_lora

    pipe = random_small_joint()
    loc = lora_modules(pipe, "localized", [2])
    assert loc == [f"transformer_blocks.2.attn.{p}" for p in
                   ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]  # fmt: skip
    # the last block only gives the image its text K/V (context_pre_only): no to_add_out
    assert len(lora_modules(pipe, "all")) == 5 * 8 + 7
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    r = text_lora(pipe, load_scorer(), "localized", [5], steps=1, batch=2, rank=2, seeds=[0], n_eval=1)
    mods = dict(pipe.transformer.named_modules())
    assert r["trainable"] == sum(2 * (mods[n].in_features + mods[n].out_features) for n in lora_modules(pipe, "localized", [5]))
    after = pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_joint_prevention_against_recorded_lstsq():
    from patchtrace.diffusion.prevent import FIT_TEMPLATES, joint_prevention_patch, prompt_sets
    from patchtrace.diffusion.smalljoint.pipeline import random_small_joint

    pipe = random_small_joint()
    patch = joint_prevention_patch(pipe, [3], "two", "seven", lam=0.01, per_template=1, seeds=[0], steps=2)
    forb, twins, others, _, _ = prompt_sets("two", "seven", FIT_TEMPLATES, 0, 1)
    proj = pipe.transformer.transformer_blocks[3].attn.add_k_proj
    lat = torch.randn((3, 16, 16), generator=torch.Generator().manual_seed(0))[None]

    def inputs(prompts):  # the projection's conditional inputs at every step, recorded here by a forward hook
        seen = []
        h = proj.register_forward_hook(lambda m, a, o: seen.append(a[0][len(prompts):].reshape(-1, 64).clone()))
        try:
            pipe(prompts, num_inference_steps=2, guidance_scale=3.0, latents=lat.repeat(len(prompts), 1, 1, 1))
        finally:
            h.remove()
        return torch.cat(seen).double()

    xf, yf, xo = inputs(forb), inputs(twins), inputs(others)
    w_old = proj.weight.detach().double()
    X, Y = torch.cat([xf, xo]), torch.cat([yf, xo])
    lhs = torch.cat([X, 0.1 * torch.eye(64, dtype=torch.float64)])
    rhs = torch.cat([Y @ w_old.T, 0.1 * w_old.T])
    ref = torch.linalg.lstsq(lhs, rhs).solution.T
    with patch.applied(pipe.transformer):
        assert torch.allclose(proj.weight.double(), ref, atol=1e-4)
        new = proj.weight.detach().double()
    assert (xf @ new.T - yf @ w_old.T).norm() < 0.5 * (xf @ w_old.T - yf @ w_old.T).norm()
    assert torch.equal(proj.weight.double(), w_old)
    assert {n.split(".")[-2] for n in patch.names} == {"add_k_proj", "add_v_proj"}


def test_pooled_edit_from_t_start_matches_encoder_swap():
    from patchtrace.diffusion.joint import text_patch_generate
    from patchtrace.diffusion.smalljoint.pipeline import random_small_joint

    pipe = random_small_joint()
    lat = torch.randn((3, 16, 16), generator=torch.Generator().manual_seed(0))[None]
    pooled_b = pipe.encode(B)[1]  # B's pooled embedding from the text encoder itself
    step = [-1]

    def swap(m, a, k):  # reference: from the 2nd transformer call on, the conditional row reads B's pooled vector
        step[0] += 1
        if step[0] >= 1:
            k["pooled_projections"] = torch.cat([k["pooled_projections"][:1], pooled_b])
        return a, k

    h = pipe.transformer.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        ref = pipe(A, num_inference_steps=3, guidance_scale=3.0, latents=lat).images
    finally:
        h.remove()
    got = text_patch_generate(pipe, A, B, [], 1, 3, 3.0, lat, pooled=True)
    assert torch.allclose(got, ref, atol=1e-6)
    plain = pipe(A, num_inference_steps=3, guidance_scale=3.0, latents=lat).images
    from_0 = text_patch_generate(pipe, A, B, [], 0, 3, 3.0, lat, pooled=True)
    assert not torch.allclose(got, plain, atol=1e-4) and not torch.allclose(got, from_0, atol=1e-4)
    assert torch.equal(text_patch_generate(pipe, A, B, [], 0, 3, 3.0, lat), plain)  # no sites: A unchanged


def test_pooled_prevention_and_lora_sites():
    from patchtrace.diffusion.adapters import DiffusionError
    from patchtrace.diffusion.prevent import FIT_TEMPLATES, joint_prevention_patch, prompt_sets
    from patchtrace.diffusion.small.pipeline import random_small
    from patchtrace.diffusion.smalljoint.pipeline import random_small_joint
    from patchtrace.diffusion.textlora import lora_modules

    pipe = random_small_joint()
    steps = 2
    patch = joint_prevention_patch(pipe, [], "two", "seven", lam=0.01, per_template=2, seeds=[0], steps=steps, pooled=True)
    forb, twins, others, _, _ = prompt_sets("two", "seven", FIT_TEMPLATES, 0, 2)
    # reference rows: each prompt's pooled vector from the encoder, once per denoising step (the solve sees every step)
    enc = lambda ps: pipe.encode(ps)[1].detach().double().repeat(steps, 1)  # noqa: E731
    xf, yf, xo = enc(forb), enc(twins), enc(others)
    lin = pipe.transformer.time_text_embed.text_embedder.linear_1
    w_old = lin.weight.detach().double()
    X, Y = torch.cat([xf, xo]), torch.cat([yf, xo])
    lhs = torch.cat([X, 0.1 * torch.eye(64, dtype=torch.float64)])
    ref = torch.linalg.lstsq(lhs, torch.cat([Y @ w_old.T, 0.1 * w_old.T])).solution.T
    assert set(patch.names) == {"time_text_embed.text_embedder.linear_1.weight"}
    with patch.applied(pipe.transformer):
        assert torch.allclose(lin.weight.double(), ref, atol=1e-4)
    assert torch.equal(lin.weight.double(), w_old)
    try:
        joint_prevention_patch(pipe, [], "two", "seven", steps=1)
        raise AssertionError("no site refused")
    except DiffusionError as e:
        assert "pooled" in str(e)
    assert lora_modules(pipe, "localized", [], pooled=True) == [
        "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2"]
    assert lora_modules(pipe, "localized", [1], pooled=True)[-2:] == lora_modules(pipe, "localized", [], pooled=True)
    assert len(lora_modules(pipe, "all", pooled=True)) == 5 * 8 + 7  # the 'all attention' arm is unchanged
    from patchtrace.diffusion.adapters import T2IAdapter

    try:
        lora_modules(T2IAdapter(random_small()), "localized", [0], pooled=True)
        raise AssertionError("UNet pooled refused")
    except DiffusionError as e:
        assert "pooled" in str(e)


def test_cli_layers_take_the_pooled_site(tmp_path):
    """``--layers pooled,1``: the joint model's pooled text path with block 1 (the CLI passes it through)."""
    import json

    from patchtrace.diffusion.small.scorer import load_scorer
    from patchtrace.diffusion.smalljoint.pipeline import build_small_joint
    from patchtrace.diffusion.textedit import text_edit

    app = build_app()
    r = CliRunner().invoke(app, ["t2i", "text-edit", "--layers", "pooled", "--pipeline", "small", "--out", str(tmp_path / "u")])
    assert r.exit_code == 2 and "'pooled' site needs a joint-attention pipeline" in r.output
    assert not (tmp_path / "u").exists()
    args = ["--glyph-a", "two", "--glyph-b", "seven", "--t-starts", "0", "--steps", "2", "--prompts", "1", "--seeds", "0"]
    r = CliRunner().invoke(app, ["t2i", "text-edit", *args, "--pipeline", "small-joint", "--layers", "pooled,1",
                                 "--out", str(tmp_path / "j")])  # fmt: skip
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "j" / "text_edit.json").read_text())
    assert got["pooled"] is True and got["layers"] == [1]
    pipe, sc = build_small_joint(), load_scorer()
    want = text_edit(pipe, sc, "two", "seven", [1], [0], 1, [0], 2, pooled=True)["rows"]
    without = text_edit(pipe, sc, "two", "seven", [1], [0], 1, [0], 2, pooled=False)["rows"]
    assert [row["psnr"] for row in got["rows"]] == [row["psnr"] for row in want]
    assert [row["psnr"] for row in want] != [row["psnr"] for row in without]  # the pooled site changes the images


def test_cli_textloc_shows_pooled_cells(tmp_path):
    import json

    from patchtrace.diffusion.smalljoint.pipeline import build_small_joint
    from patchtrace.diffusion.textloc import joint_fractions

    r = CliRunner().invoke(build_app(), ["t2i", "textloc", "--pipeline", "small-joint", "--prompts", "1", "--seeds", "0",
                                         "--steps", "1", "--out", str(tmp_path / "t")])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = {row["cell"]: row for row in json.loads((tmp_path / "t" / "textloc.json").read_text())["layers"]}
    assert {"pooled", "pooled+L1", "pooled+all"} <= set(rows)
    pipe = build_small_joint()
    assert rows["pooled+L1"]["kv_fraction"] == joint_fractions(pipe, [1], pooled=True)[0]
    assert rows["pooled"]["kv_fraction"] == joint_fractions(pipe, [], pooled=True)[0] > 0


def test_text_edit_refuses_bad_sites_before_drawing(monkeypatch):
    import pytest

    from patchtrace.diffusion import textedit
    from patchtrace.diffusion.adapters import DiffusionError
    from patchtrace.diffusion.small.pipeline import build_small
    from patchtrace.diffusion.smalljoint.pipeline import random_small_joint

    def drawn(*a, **k):
        raise AssertionError("an image was drawn before the sites were checked")

    monkeypatch.setattr(textedit, "patched_images", drawn)
    with pytest.raises(DiffusionError, match="'pooled' site needs a joint-attention pipeline"):
        textedit.text_edit(build_small(), None, "two", "seven", [1], [0], pooled=True)
    with pytest.raises(DiffusionError, match="layer 6 does not exist"):
        textedit.text_edit(random_small_joint(), None, "two", "seven", [6], [0], pooled=True)


def test_pooled_projection_is_found_by_name_and_refused_where_missing():
    from types import SimpleNamespace

    import pytest

    from patchtrace.diffusion.adapters import DiffusionError
    from patchtrace.diffusion.joint import pooled_projection
    from patchtrace.diffusion.smalljoint.pipeline import random_small_joint

    pipe = random_small_joint()
    assert pooled_projection(pipe) is pipe.transformer.time_text_embed.text_embedder
    with pytest.raises(DiffusionError, match=r"'pooled' site needs a joint-attention pipeline: Linear has no pooled text projection \(time_text_embed.text_embedder\)"):
        pooled_projection(SimpleNamespace(transformer=torch.nn.Linear(2, 2)))
