"""The seeded recipe that trains the small joint-attention model from nothing (one CPU thread).

Run ``python -m patchtrace.diffusion.smalljoint.train`` (about 25 minutes on one thread). Same data, captions,
held-out combinations, schedule and x0 ("sample") prediction as the small UNet model
(:mod:`patchtrace.diffusion.small.train`), so both architectures are scored by the same classifiers.
Additions aimed at the glyph (the small UNet model learned colour, background, position and style but
drew the glyph at chance; issue 12's lesson, see its recipe in :mod:`patchtrace.diffusion.small.train`):

- an auxiliary loss on the text encoder: linear heads (:func:`.model.build_aux_heads`, training only)
  must read every attribute, the glyph included, from its pooled output — so the glyph words are
  separated before the transformer has to use them;
- issue 12's region loss (``region_loss``): the glyph's frame rectangle weighs ``fg_weight`` times in
  the denoising loss, ink or not (a weight on "pixels that differ from the background" depends on the
  target and pushes uncertain pixels toward ink: blobs);
- renders without placement jitter (the glyph always at its fixed place; the classifiers, trained with
  jitter, still read it), and half of the timesteps from the noisy half, where the shape must come from
  the text rather than from ``x_t``;
- colour-word dropout (``attr_dropout`` 0.3 on ``color`` only): 30% of captions lose their colour word
  (the image keeps its colour; the auxiliary loss stops asking for it). The joint model otherwise binds
  colour to glyph: the committed 900-update weights without it drew held-out (glyph, colour) pairs at
  glyph 0.57 / colour 0.58. Dropping the glyph word too, or the pooled embedding, or half the colour
  words, or a per-token auxiliary loss all did worse (BENCHMARKS.md, "Text in images (issue 13)");
- 3500 updates: held-out glyph accuracy rose with length (1500: 0.73, 2200: 0.79, 3500: 0.93).

Single-threaded and seeded: the same torch on the same CPU reproduces the weights bit for bit; the
sha256 is recorded in ``weights/small_joint.json`` and checked at every load.
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
    "seed": 0, "steps": 3500, "batch": 64, "lr": 2e-3, "warmup": 50, "ema": 0.99,
    "caption_dropout": 0.1, "threads": 1, "fg_weight": 10.0, "aux_weight": 1.0,
    "jitter": False, "high_noise_share": 0.5,
    "region_loss": True, "attr_dropout": 0.3, "attr_dropout_attrs": ["color"],
}  # fmt: skip


def render_batch(rng: Any, n: int, specs: list[Any], jitter: bool) -> tuple[Any, list[str], dict[str, Any]]:
    """``n`` renders with paraphrased captions and labels; without ``jitter`` every glyph sits at its
    fixed place (issue 12's lesson: with 0-2 px jitter the high-noise target is a blur over 9 placements)."""
    import numpy as np

    from patchtrace.diffusion.small import data

    if jitter:
        return data.sample_batch(rng, n, specs)
    idx = rng.integers(0, len(specs), n)
    chosen = [specs[int(i)] for i in idx]
    caps = [data.caption(s, int(rng.integers(0, 4)), int(rng.integers(0, 2))) for s in chosen]
    labels = {a: np.array([s.labels()[a] for s in chosen]) for a in data.ATTRIBUTES}
    return np.stack([data.render(s) for s in chosen]), caps, labels


def _drop_attribute(rng: Any, caps: list[str], labels: dict[str, Any], named: dict[str, Any],
                    p: float, which_attrs: tuple[str, ...] = ("color", "glyph")) -> tuple[list[str], dict[str, Any]]:  # fmt: skip
    """With probability ``p`` per (non-empty) caption, remove its colour word or its glyph words (one of
    the two, at random); the image keeps the attribute, the auxiliary loss no longer asks for it."""
    import re

    from patchtrace.diffusion.small.data import ATTRIBUTES, GLYPH_WORDS

    named = {a: v.copy() for a, v in named.items()}
    hit, which = rng.random(len(caps)) < p, rng.integers(0, len(which_attrs), len(caps))
    out = []
    for i, c in enumerate(caps):
        if c and hit[i]:
            a = which_attrs[int(which[i])]
            v = ATTRIBUTES[a][int(labels[a][i])]
            word = GLYPH_WORDS[v] if a == "glyph" else v
            c = " ".join(re.sub(rf"\b{re.escape(word)}\b", " ", c).split())
            named[a][i] = False
        out.append(c)
    return out, named


def _token_aux(heads: Any, states: Any, ids: Any, labels: dict[str, Any], word_ids: dict[str, Any]) -> Any:
    """Cross-entropy of each attribute read from its own word's token state (captions naming it).

    The text encoder is causal and most templates put the colour right before the glyph ("a blue two"),
    so the glyph word's state depends on the colour before it; for a held-out (glyph, colour) pair that
    state was never seen in training. Asking every glyph-word state to name its glyph, whatever came
    before it, pushes the glyph's reading to be the same in every colour context."""
    import torch

    total = states.new_zeros(())
    for a, wid in word_ids.items():
        hit = (ids[..., None] == wid).any(-1)  # [B, L]: the attribute's word
        rows, pos = hit.nonzero(as_tuple=True)
        if len(rows):
            y = torch.from_numpy(labels[a])[rows]
            total = total + torch.nn.functional.cross_entropy(heads[a](states[rows, pos]), y)
    return total


def _lr(step: int, r: dict[str, Any]) -> float:
    import math

    if step < r["warmup"]:
        return r["lr"] * (step + 1) / r["warmup"]
    frac = (step - r["warmup"]) / max(1, r["steps"] - r["warmup"])
    return r["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _save(tr: Any, te: Any, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {f"transformer.{k}": v.contiguous() for k, v in tr.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v.contiguous() for k, v in te.state_dict().items()})
    save_file(tensors, str(path))


def train_joint(recipe: dict[str, Any] = RECIPE, out: Path = WEIGHTS_DIR, log_every: int = 25,
                snapshot_every: int = 0, name: str = "small_joint") -> dict[str, Any]:  # fmt: skip
    """Train text encoder + transformer (+ auxiliary heads) per ``recipe``; write weights + JSON to ``out``."""
    import copy

    import numpy as np
    import torch

    from patchtrace.diffusion.small import data
    from patchtrace.diffusion.small.model import MAX_LEN, build_scheduler, build_tokenizer
    from patchtrace.diffusion.small.train import _region_mask
    from patchtrace.diffusion.smalljoint import model

    torch.set_num_threads(recipe["threads"])
    torch.manual_seed(recipe["seed"])
    rng = np.random.default_rng(recipe["seed"])
    tok = build_tokenizer()
    tr, te, heads = model.build_transformer(), model.build_text_encoder(len(tok)), model.build_aux_heads()
    ema_tr, ema_te = copy.deepcopy(tr).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    params = list(tr.parameters()) + list(te.parameters()) + list(heads.parameters())
    tok_heads, word_ids = None, {}
    if recipe.get("token_aux"):  # opt-in: the glyph/colour word's OWN state must name its value
        tok_heads = model.build_aux_heads()
        params += list(tok_heads.parameters())
        for a in ("glyph", "color"):
            vals = data.ATTRIBUTES[a]
            words = [data.GLYPH_WORDS[v].split()[-1] if a == "glyph" else v for v in vals]
            word_ids[a] = torch.tensor([tok.convert_tokens_to_ids(w) for w in words])
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=0.0)
    alphas = build_scheduler("ddpm").alphas_cumprod
    specs, T = data.all_specs(held_out=False), 1000
    losses, aux_losses, t0 = [], [], time.time()
    for step in range(recipe["steps"]):
        for g in opt.param_groups:
            g["lr"] = _lr(step, recipe)
        x, caps, labels = render_batch(rng, recipe["batch"], specs, recipe.get("jitter", True))
        drop = rng.random(len(caps)) < recipe["caption_dropout"]
        caps = ["" if d else c for c, d in zip(caps, drop)]
        named = {a: ~drop for a in labels}  # which captions name each attribute (for the auxiliary loss)
        if recipe.get("attr_dropout"):  # drop the colour or the glyph phrase alone: each word must bind by itself
            caps, named = _drop_attribute(rng, caps, labels, named, recipe["attr_dropout"],
                                          tuple(recipe.get("attr_dropout_attrs", ("color", "glyph"))))  # fmt: skip
        ids = tok(caps, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt").input_ids
        enc = te(ids)
        aux = sum(torch.nn.functional.cross_entropy(heads[a](enc.text_embeds[torch.from_numpy(named[a])]),
                                                    torch.from_numpy(y[named[a]]))
                  for a, y in labels.items())  # fmt: skip
        if tok_heads is not None:
            aux = aux + recipe["token_aux"] * _token_aux(tok_heads, enc.last_hidden_state, ids, labels, word_ids)
        x0 = torch.from_numpy(x)
        t_np = rng.integers(0, T, len(caps))
        if recipe.get("high_noise_share"):  # where the image must come from the text, not from x_t
            t_np = np.where(rng.random(len(caps)) < recipe["high_noise_share"], rng.integers(T // 2, T, len(caps)), t_np)
        t = torch.from_numpy(t_np)
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pooled = enc.text_embeds if recipe.get("pooled", True) else torch.zeros_like(enc.text_embeds)
        if recipe.get("pooled_dropout"):  # some rows without the pooled path: the tokens must carry the caption
            off = torch.from_numpy(rng.random(len(caps)) < recipe["pooled_dropout"]).view(-1, 1)
            pooled = torch.where(off, torch.zeros_like(pooled), pooled)
        pred = tr(xt, encoder_hidden_states=enc.last_hidden_state, pooled_projections=pooled, timestep=t).sample
        if recipe.get("region_loss"):  # issue 12's lesson: the glyph's frame rectangle, ink or not
            fg = _region_mask(labels["position"])
        else:
            fg = ((x0 - x0[..., :1, :1]).abs().sum(1, keepdim=True) > 0.01).float()
        loss = (((pred - x0) ** 2) * (1 + (recipe["fg_weight"] - 1) * fg)).mean()
        total = loss + recipe["aux_weight"] * aux
        opt.zero_grad(set_to_none=True)
        total.backward()  # type: ignore[union-attr]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for ema, live in ((ema_tr, tr), (ema_te, te)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - recipe["ema"])
        losses.append(float(loss.detach()))
        aux_losses.append(float(aux.detach()))  # type: ignore[union-attr]
        if step % log_every == 0 or step == recipe["steps"] - 1:
            print(f"step {step} loss {np.mean(losses[-log_every:]):.4f} aux {np.mean(aux_losses[-log_every:]):.3f} "
                  f"{time.time() - t0:.0f}s", flush=True)  # fmt: skip
        if snapshot_every and step and step % snapshot_every == 0:
            out.mkdir(parents=True, exist_ok=True)
            _save(ema_tr, ema_te, out / f"snapshot_{step}.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.safetensors"
    _save(ema_tr, ema_te, path)
    meta = {
        "recipe": recipe, "train_seconds": round(time.time() - t0, 1), "final_loss": float(np.mean(losses[-50:])),
        "final_aux_loss": float(np.mean(aux_losses[-50:])), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "torch": torch.__version__, "prediction_type": "sample",
        "parameters": {"transformer": sum(p.numel() for p in tr.parameters()),
                       "text_encoder": sum(p.numel() for p in te.parameters())},
    }  # fmt: skip
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1))
    return meta


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: train into ``--out`` (default: the committed weights' folder)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--steps", type=int, default=RECIPE["steps"])
    p.add_argument("--snapshot-every", type=int, default=0)
    a = p.parse_args(argv)
    print(train_joint({**RECIPE, "steps": a.steps}, a.out, snapshot_every=a.snapshot_every))


if __name__ == "__main__":
    main()
