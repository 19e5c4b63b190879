"""The recipe that trains the small text-to-image model and its attribute classifiers from nothing.

Run ``python -m patchtrace.diffusion.small.train`` (about 13 minutes of one busy CPU core, less on
a free one). It is seeded and single-threaded (the float reductions then happen in one order, so the
same torch version on the same CPU reproduces the weights bit for bit; the sha256 of the result is
written in ``weights/small_t2i.json`` to check it). The weights are committed to the repository
(4.6 MB) so that tests, docs and CI never train.

What is trained:

- the text encoder and the UNet **jointly**, in one stage from random initialization, on
  unjittered renders from :mod:`.data` with paraphrased captions (10% of captions dropped to the
  empty prompt, for classifier-free guidance); x0 ("sample") prediction under a cosine schedule,
  sampled in 10 DDIM steps;
- the attribute classifiers (:mod:`.scorer`) on jittered renders with noise, the scorers of
  generated images — the analogue of the CLIP score in the LocoGen paper.

What makes the model draw the prompted *glyph* (an earlier three-stage recipe drew a blob of the
right colour and the glyph at chance; docs/diffusion.md has the measurements):

- the loss weighs the glyph's frame **rectangle** 10×, ink or not (:func:`_region_mask`). Weighing
  only the pixels that differ from the background biases the optimum towards ink and gives blobs;
- no placement jitter: with it, the high-noise target is a blur over nine placements, and at
  lower noise the model reads the shape from x_t, so the prompt never has to decide the glyph;
- half the timesteps from the noisy half, where the image can only come from the text;
- an auxiliary loss: linear heads on the text encoder's pooled (EOS) state classify every
  attribute of the caption, so that the encoder keeps the glyph words apart from the start.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).parent / "weights"
RECIPE: dict[str, Any] = {
    "seed": 0,
    "steps": 600,
    "batch": 64,
    "lr": 2e-3,
    "warmup": 20,
    "ema": 0.99,
    "caption_dropout": 0.1,
    "threads": 1,
    "jitter": False,
    "aux_weight": 1.0,
    "high_noise_share": 0.5,
    "fg_weight": 10.0,
}


def _lr(step: int, r: dict[str, Any]) -> float:
    import math

    if step < r["warmup"]:
        return r["lr"] * (step + 1) / r["warmup"]
    frac = (step - r["warmup"]) / max(1, r["steps"] - r["warmup"])
    return r["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _region_mask(position: Any) -> Any:
    """``(n, 1, SIZE, SIZE)``: 1 on the rectangle of an unjittered glyph's frame (box or not), else 0.

    Weighing these pixels, rather than the pixels that differ from the background, keeps the loss's
    optimum unbiased inside the glyph's cell: with ink-only weights, a pixel that is ink with
    probability p is pulled towards the ink colour far beyond p, and the model paints a blob.
    """
    import torch

    from patchtrace.diffusion.small.data import POSITIONS, SIZE

    m = torch.zeros(len(position), 1, SIZE, SIZE)
    for i, p in enumerate(position):
        x0 = 2 if POSITIONS[int(p)] == "left" else 10
        m[i, :, 2:13, max(x0 - 2, 0) : min(x0 + 7, SIZE)] = 1
    return m


def _save(ema_te: Any, ema_unet: Any, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {f"unet.{k}": v.contiguous() for k, v in ema_unet.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v.contiguous() for k, v in ema_te.state_dict().items()})
    save_file(tensors, str(path))


def train_t2i(recipe: dict[str, Any], out: Path, log_every: int = 25, snapshot_every: int = 0,
              init: Path | None = None, name: str = "small_t2i") -> dict[str, Any]:
    """Train the text encoder + UNet per ``recipe``; write ``small_t2i.safetensors`` + JSON to ``out``."""
    import copy

    import numpy as np
    import torch

    from patchtrace.diffusion.small import data, model

    torch.set_num_threads(recipe["threads"])
    torch.manual_seed(recipe["seed"])
    rng = np.random.default_rng(recipe["seed"])
    tok = model.build_tokenizer()
    te, unet = model.build_text_encoder(len(tok)), model.build_unet()
    if init is not None:
        from safetensors.torch import load_file

        tensors = load_file(str(init))
        unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        te.load_state_dict({k[13:]: v for k, v in tensors.items() if k.startswith("text_encoder.")})
    sched = model.build_scheduler("ddpm")
    ema_te, ema_unet = copy.deepcopy(te).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    params = list(te.parameters()) + list(unet.parameters())
    heads = None
    if recipe.get("aux_weight"):  # attribute classifiers on the text encoder's pooled (EOS) state
        heads = torch.nn.ModuleDict({k: torch.nn.Linear(te.config.hidden_size, len(v)) for k, v in data.ATTRIBUTES.items()})
        params += list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=0.0)
    specs = data.all_specs(held_out=False)
    alphas = sched.alphas_cumprod
    losses, t0 = [], time.time()
    T = sched.config.num_train_timesteps
    for step in range(recipe["steps"]):
        for g in opt.param_groups:
            g["lr"] = _lr(step, recipe)
        x, caps, labels = data.sample_batch(rng, recipe["batch"], specs, recipe["jitter"])
        drop = rng.random(len(caps)) < recipe["caption_dropout"]
        caps = ["" if d else c for c, d in zip(caps, drop)]
        ids = tok(caps, padding="max_length", max_length=model.MAX_LEN, truncation=True, return_tensors="pt")
        te_out = te(ids.input_ids)
        cond = te_out.last_hidden_state
        x0 = torch.from_numpy(x)
        t_np = rng.integers(0, T, len(caps))
        if recipe.get("high_noise_share"):
            high = rng.random(len(caps)) < recipe["high_noise_share"]
            t_np = np.where(high, rng.integers(T // 2, T, len(caps)), t_np)
        t = torch.from_numpy(t_np)
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(xt, t, cond).sample
        fg = _region_mask(labels["position"])  # the glyph's frame rectangle, ink or not
        loss = (((pred - x0) ** 2) * (1 + (recipe["fg_weight"] - 1) * fg)).mean()
        if heads is not None:  # every attribute must be readable from the caption's encoding
            keep = torch.from_numpy(~drop)
            pooled = te_out.pooler_output[keep]
            aux = sum(torch.nn.functional.cross_entropy(h(pooled), torch.from_numpy(labels[k][~drop]))
                      for k, h in heads.items())  # fmt: skip
            loss = loss + recipe["aux_weight"] * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for ema, live in ((ema_te, te), (ema_unet, unet)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - recipe["ema"])
        losses.append(float(loss.detach()))
        if step % log_every == 0 or step == recipe["steps"] - 1:
            print(f"step {step} loss {np.mean(losses[-log_every:]):.4f} {time.time() - t0:.0f}s", flush=True)
        if snapshot_every and step and step % snapshot_every == 0:  # for watching a long run, not the recipe
            out.mkdir(parents=True, exist_ok=True)
            _save(ema_te, ema_unet, out / f"snapshot_{step}.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.safetensors"
    _save(ema_te, ema_unet, path)
    meta = {
        "recipe": recipe,
        "train_seconds": round(time.time() - t0, 1),
        "final_loss": float(np.mean(losses[-50:])),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "torch": torch.__version__,
        "prediction_type": "sample",
    }
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1))
    return meta


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: train the model (and the classifiers) into ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--snapshot-every", type=int, default=0)
    p.add_argument("--what", choices=("all", "t2i", "scorer"), default="all")
    a = p.parse_args(argv)
    if a.what in ("all", "scorer"):
        from patchtrace.diffusion.small.scorer import train_scorer

        print(train_scorer(a.out))
    if a.what in ("all", "t2i"):
        print(train_t2i(RECIPE, a.out, snapshot_every=a.snapshot_every))


if __name__ == "__main__":
    main()
