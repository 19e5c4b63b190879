"""Causal tracing on the text encoder of a text-to-image pipeline (Basu et al., ICLR 2024, ROME-style).

Where does the *text encoder* hold an attribute? Corrupt the attribute's words in the prompt (add
Gaussian noise, 3× the token-embedding standard deviation, to their input embeddings), then restore
the clean hidden state of one encoder layer at those tokens and generate. If the restored layer's
state alone brings the attribute back into the image, that layer carries it. The earlier finding on
SD 1.x: knowledge sits in the first layer(s) of the text encoder, while LocoGen shows it spread over
a few UNet layers — :func:`trace_text_encoder` puts a number on this for any SD-family pipeline with
one CLIP text encoder.

Scores over the ``layer`` axis (encoder layers): value = restored score − corrupted score; baselines
``clean`` (no noise) and ``corrupt`` (noise, nothing restored). Same seeds and noise for every
condition; rows are batched into pipeline calls like LocoGen's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from patchtrace.diffusion.adapters import DiffusionError, T2IAdapter
from patchtrace.diffusion.locogen import ScoreFn


def word_positions(tokenizer: Any, prompt: str, words: str) -> list[int]:
    """Token positions of ``words`` in ``prompt`` (as the pipeline tokenizes it, BOS included)."""
    ids = tokenizer(prompt).input_ids
    sub = tokenizer(words, add_special_tokens=False).input_ids
    for i in range(len(ids) - len(sub) + 1):
        if sub and ids[i : i + len(sub)] == sub:
            return list(range(i, i + len(sub)))
    raise DiffusionError(f"words {words!r} do not occur in prompt {prompt!r} as tokens")


def _encoder_parts(te: Any) -> tuple[Any, Any]:
    tm = getattr(te, "text_model", te)  # transformers 5 flattens CLIPTextModel
    return tm.embeddings, tm.encoder.layers


def _states(adapter: T2IAdapter, prompts: list[str], positions: list[list[int]], noise: Any,
            restore: int | None, clean: Any) -> Any:  # fmt: skip
    """Encoder output with noise at ``positions`` and (optionally) layer ``restore`` restored there."""
    import torch

    pipe = adapter.pipe
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    emb, layers = _encoder_parts(pipe.text_encoder)
    mask = torch.zeros(len(prompts), ids.input_ids.shape[1], 1)
    for i, pos in enumerate(positions):
        mask[i, pos] = 1.0

    def add_noise(m: Any, a: Any, out: Any) -> Any:
        return out + mask * noise

    def put_back(m: Any, a: Any, out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out
        h = h * (1 - mask) + clean[int(restore or 0) + 1] * mask
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handles = [emb.register_forward_hook(add_noise)]
    if restore is not None:
        handles.append(layers[restore].register_forward_hook(put_back))
    try:
        with torch.no_grad():
            return pipe.text_encoder(ids.input_ids.to(pipe.unet.device))[0]
    finally:
        for h in handles:
            h.remove()


def trace_text_encoder(
    adapter: T2IAdapter,
    prompts: Sequence[str],
    words: Sequence[str],
    score_fn: ScoreFn | None,
    seeds: Sequence[int] = (0, 1, 2, 3),
    noise_scale: float = 3.0,
    noise_seed: int = 0,
    max_rows: int = 64,
) -> Any:
    """Per text-encoder layer, how much restoring its state at the attribute's tokens recovers the score."""
    import torch

    from patchtrace.results import Scores, library_version

    if adapter.family != "sd":
        raise DiffusionError(f"text-encoder tracing needs one CLIP text encoder; {type(adapter.pipe).__name__} has two")
    if score_fn is None:
        raise DiffusionError("no scorer given for the attribute: pass score_fn")
    prompts, seeds = list(prompts), list(seeds)
    if len(words) != len(prompts):
        raise DiffusionError(f"{len(prompts)} prompts but {len(words)} attribute word groups")
    adapter.check_prompts(prompts)
    positions = [word_positions(adapter.pipe.tokenizer, p, w) for p, w in zip(prompts, words)]
    emb, layers = _encoder_parts(adapter.pipe.text_encoder)
    sd = float(emb.token_embedding.weight.detach().std())
    g = torch.Generator().manual_seed(noise_seed)
    T = adapter.pipe.tokenizer.model_max_length
    noise = noise_scale * sd * torch.randn(len(prompts), T, emb.token_embedding.weight.shape[1], generator=g)
    tok = adapter.pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=T, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        clean = adapter.pipe.text_encoder(ids, output_hidden_states=True).hidden_states
    enc = adapter.encode(prompts)
    conds = [enc.pos, _states(adapter, prompts, positions, noise, None, clean)]
    conds += [_states(adapter, prompts, positions, noise, i, clean) for i in range(len(layers))]
    P, S = len(prompts), len(seeds)
    rows = [(c, p, s) for c in range(len(conds)) for p in range(P) for s in range(S)]
    latents = adapter.latents(seeds)
    outs = []
    for i in range(0, len(rows), max_rows):
        chunk = rows[i : i + max_rows]
        cond = enc.rows([p for _, p, _ in chunk])
        cond.pos = torch.stack([conds[c][p] for c, p, _ in chunk])
        outs.append(adapter.generate(cond, latents[[s for _, _, s in chunk]]))
    imgs = torch.cat(outs).reshape(len(conds), P, S, *outs[0].shape[1:])
    pidx = torch.arange(P).repeat_interleave(S)
    cs = torch.stack([score_fn(imgs[c].flatten(0, 1), pidx).reshape(P, S) for c in range(len(conds))]).float()
    effect = (cs[2:] - cs[1].unsqueeze(0)).flatten(1)  # (layers, P*S)
    scores = Scores(
        values=effect.mean(1), axes=("layer",), site_kind="text_encoder", value_name="effect",
        metric="attribute_score", baselines={"clean": float(cs[0].mean()), "corrupt": float(cs[1].mean())},
        per_example=effect.T, extras={"patched": cs[2:].flatten(1).mean(1)},
        provenance={"library": "patchtrace", "version": library_version(), "method": "text_encoder_tracing",
                    "pipeline": type(adapter.pipe).__name__, "prompts": prompts, "words": list(words),
                    "config": {"noise_scale": noise_scale, "steps": adapter.steps, "guidance": adapter.guidance},
                    "seeds": {"noise": seeds, "corruption": noise_seed}},
    )  # fmt: skip
    return scores, imgs, cs
