"""LocoGen: batched rows equal the paper's loop and a naive reference; checkpoint/resume; refusals."""

from __future__ import annotations

import pytest
import torch
from t2i_reference import swap_encoder_states

from patchtrace.diffusion.adapters import DiffusionError, T2IAdapter
from patchtrace.diffusion.locogen import locogen, windows

P = ["a red two on a white background on the left in a box"]
A = ["a red two on a white background on the left"]


def red(images, pidx):  # a transparent score: mean red channel
    return images[:, 0].mean((1, 2))


def test_windows():
    assert windows(6, 2) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert windows(3, 3) == [(0, 1, 2)]
    with pytest.raises(DiffusionError, match="window of 7 layers is larger than the 6"):
        windows(6, 7)


@pytest.fixture(scope="module")
def run(sd):
    a = T2IAdapter(sd, steps=1)
    return a, locogen(a, P, A, red, window=3, seeds=[0, 1], batched=True)


def test_batched_equals_loop_and_reference(run):
    a, fast = run
    slow = locogen(a, P, A, red, window=3, seeds=[1], batched=False)  # one seed keeps the loop short
    assert torch.allclose(fast.images[:, :, 1:], slow.images, atol=1e-5)
    # the naive reference: pipeline on the altered prompt, original states everywhere but window 2 = (2, 3, 4)
    orig, alt = a.encode(P * 2), a.encode(A * 2)
    names = {layer.name: orig.pos for j, layer in enumerate(a.layers) if j not in (2, 3, 4)}
    with swap_encoder_states(a.pipe.unet, names):
        ref = a.generate(alt, a.latents([0, 1]))
    assert torch.allclose(fast.images[1 + 2, 0], ref, atol=1e-5)
    plain = a.generate(orig, a.latents([0, 1]))
    assert torch.allclose(fast.images[0, 0], plain, atol=1e-5)  # condition 0: the unintervened image


def test_scores_are_drops(run):
    _, r = run
    cs = torch.stack([red(r.images[c, 0], None) for c in range(r.images.shape[0])])
    assert torch.allclose(r.scores.values, (cs[0] - cs[1:-1]).mean(1), atol=1e-6)
    assert r.scores.labels["window"] == ["L0-2", "L1-3", "L2-4", "L3-5"]
    assert r.scores.baselines["corrupt"] == pytest.approx(float(cs[-1].mean()), abs=1e-6)


def test_checkpoint_resume(sd, tmp_path, run):
    a, ref = run
    calls = []
    orig_generate = a.generate

    def counting(*args, **kw):
        calls.append(1)
        return orig_generate(*args, **kw)

    a.generate = counting  # type: ignore[method-assign]
    try:

        def stop(done, total):
            if done >= 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            locogen(a, P, A, red, window=3, seeds=[0, 1], max_rows=4, checkpoint=tmp_path, on_progress=stop)
        first = len(calls)
        r = locogen(a, P, A, red, window=3, seeds=[0, 1], max_rows=4, checkpoint=tmp_path)
        assert (first, len(calls) - first) == (1, 2)  # 6 conditions, 2 per call; the first call's were saved
        assert torch.allclose(r.images, ref.images, atol=1e-5)
    finally:
        del a.generate


def test_bad_input_before_any_step(sd):
    a = T2IAdapter(sd, steps=1)
    a.generate = lambda *x, **k: pytest.fail("denoised despite bad input")  # type: ignore[method-assign]
    with pytest.raises(DiffusionError, match="no scorer"):
        locogen(a, P, A, None)
    with pytest.raises(DiffusionError, match="larger than the 6"):
        locogen(a, P, A, red, window=9)
    with pytest.raises(DiffusionError, match=r"altered prompt .* over the text encoder's limit"):
        locogen(a, P, ["a red two " * 6], red)
    with pytest.raises(DiffusionError, match="1 prompts but 2 altered"):
        locogen(a, P, A * 2, red)
