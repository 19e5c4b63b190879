"""The small model's training recipe: its loss region and unjittered renders, and that it is deterministic.

The recipe weighs a fixed rectangle per position (:func:`train._region_mask`) instead of the pixels
that differ from the background; these tests check, independently of the mask's code, that every
glyph and box pixel of every unjittered render falls inside it, and that two short seeded runs give
byte-identical weights (the committed sha256 relies on that).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def test_unjittered_render_is_the_centred_one_and_draws_no_rng():
    from patchtrace.diffusion.small import data

    rng = np.random.default_rng(0)
    for spec in data.all_specs()[::7]:
        assert np.array_equal(data.render(spec, rng, jitter=False), data.render(spec))
    assert rng.integers(0, 1000) == np.random.default_rng(0).integers(0, 1000)  # no draw was spent
    jittered = {data.render(data.all_specs()[0], rng).tobytes() for _ in range(30)}
    assert len(jittered) > 1  # the default (the classifiers' renders) still jitters


def test_region_covers_every_drawn_pixel_and_little_else():
    from patchtrace.diffusion.small import data
    from patchtrace.diffusion.small.train import _region_mask

    specs = data.all_specs()
    imgs = np.stack([data.render(s) for s in specs])
    drawn = np.abs(imgs - imgs[:, :, :1, :1]).sum(1) > 0.01  # differs from the background corner
    pos = np.array([s.labels()["position"] for s in specs])
    mask = _region_mask(pos)[:, 0].numpy() > 0
    assert not (drawn & ~mask).any()
    for i, spec in enumerate(specs):
        if spec.style == "boxed":  # the frame's bounding rectangle is exactly the weighted region
            ys, xs = np.nonzero(drawn[i])
            box = np.zeros_like(mask[i])
            box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
            assert np.array_equal(box, mask[i]), spec
    assert mask.sum((1, 2)).max() < 0.4 * mask[0].size  # a region, not the whole image

def test_recipe_is_deterministic(tmp_path):
    from patchtrace.diffusion.small.train import RECIPE, train_t2i

    threads = torch.get_num_threads()
    try:
        recipe = {**RECIPE, "steps": 2, "batch": 4, "warmup": 1}
        shas = [train_t2i(recipe, tmp_path / str(i), log_every=100)["sha256"] for i in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert shas[0] == shas[1]
    other = train_t2i({**recipe, "seed": 1}, tmp_path / "other", log_every=100)["sha256"]
    torch.set_num_threads(threads)
    assert other != shas[0]
    raw = (tmp_path / "0" / "small_t2i.safetensors").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == shas[0]
