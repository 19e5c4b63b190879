"""Encoder families (BERT, RoBERTa): what differs from a decoder, in one place.

A masked-language-model encoder runs the same block stages as a decoder (:mod:`patchtrace.models.stages`)
with four differences, each a field of its :class:`~patchtrace.models.adapters.Family` table:

* **bidirectional attention** (``causal=False``): every position attends to every other, so a patch at
  position ``p`` changes the stream at *all* positions of the layers above it. The sweep engine's
  suffix shortcut (recompute only positions ``≥ p`` against cached keys/values of the prefix) is
  therefore wrong for these models; the engine turns it off and says so in the sweep plan, and still
  resumes at the patched layer (layers below a patch are unchanged whatever the attention).
* **post-norm blocks** (``post_ln``): the LayerNorm comes *after* each residual add,
  ``resid_mid = LN₁(resid_pre + attn_out)`` and ``resid_post = LN₂(resid_mid + mlp_out)``; nothing
  normalises a sublayer's input. The site kinds keep their names and mean (see :mod:`patchtrace.kinds`):
  ``resid_pre`` the stream entering the layer (the previous layer's ``resid_post``, or the
  normalised embedding); ``resid_mid`` the stream after the attention add *and* its LayerNorm (what
  the MLP reads); ``resid_post`` after the MLP add and its LayerNorm; ``attn_out`` / ``mlp_out`` the
  sublayer outputs *before* the add and the norm (what is added); ``embed`` the embedding sum
  (word + position + token type 0) *after* the embedding LayerNorm.
* **embeddings**: word + learned absolute position + token type (always type 0: patchtrace prompts are
  one segment), then a LayerNorm. RoBERTa numbers positions from ``pad_token_id + 1`` and gives
  padding tokens the padding position, exactly as transformers' ``create_position_ids_from_input_ids``.
* **the MLM head** instead of a final norm: ``decoder(LN(act(dense(h))))``, the decoder's weight tied
  to the word embeddings, with its own bias. The metric reads it at the **mask position** (the
  readout; :meth:`patchtrace.tasks.base.TokenizedTask.readout`), which need not be the last position.

Config options that change the computation and that the runner does not implement are refused by name
(:func:`encoder_dims`): relative position embeddings, a decoder (``is_decoder``), cross-attention.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from patchtrace.models.adapters import Dims, Family, UnsupportedModelError, get_path


def _refuse_options(config: Any) -> None:
    mt = config.model_type
    pet = getattr(config, "position_embedding_type", None)  # dropped by transformers 5; old configs carry it
    if pet not in (None, "absolute"):
        raise UnsupportedModelError(f"{mt} option position_embedding_type={pet!r} is not implemented "
                                    "(only 'absolute' position embeddings)")
    for flag in ("is_decoder", "add_cross_attention"):
        if getattr(config, flag, False):
            raise UnsupportedModelError(f"{mt} option {flag}=True is not implemented (patchtrace runs {mt} as a "
                                        "masked-LM encoder)")


def encoder_dims(config: Any) -> Dims:
    """The dimensions of a BERT/RoBERTa config, refusing options the runner does not implement."""
    _refuse_options(config)
    d, h = config.hidden_size, config.num_attention_heads
    if d % h:
        raise UnsupportedModelError(f"{config.model_type}: hidden_size {d} is not a multiple of {h} heads")
    act = config.hidden_act
    if not isinstance(act, str):
        raise UnsupportedModelError(f"{config.model_type} option hidden_act={act!r} (a callable) is not implemented")
    n = config.num_hidden_layers
    return Dims(
        n_layers=n,
        d_model=d,
        n_heads=h,
        n_kv_heads=h,
        d_head=d // h,
        d_mlp=config.intermediate_size,
        vocab=config.vocab_size,
        parallel_residual=False,
        act=act,
        attn_scale=(d // h) ** -0.5,
        sliding_window=None,
        layer_windows=(None,) * n,
        layer_types=("full_attention",) * n,
    )


def check_head(hf_model: Any, family: Family) -> None:
    """Refuse an encoder without its masked-LM head (``BertModel``, a classification model ...)."""
    try:
        get_path(hf_model, family.final_norm)
        if family.head_dense:
            get_path(hf_model, family.head_dense)
    except AttributeError:
        raise UnsupportedModelError(
            f"{type(hf_model).__name__}: patchtrace runs {family.name} as a masked language model; load it as "
            f"{'Bert' if family.name == 'bert' else 'Roberta'}ForMaskedLM (load_model does)"
        ) from None


def embed(model: Any, family: Family, embed_tokens: Any, pos_embed: Any, ids: Tensor, pos_offset: int) -> Tensor:
    """Word + position + token-type-0 embeddings of ``ids``, then the embedding LayerNorm."""
    if pos_offset:
        raise UnsupportedModelError(f"{family.name}: attention is bidirectional, a forward cannot resume after a "
                                    "cached prefix (pos_offset must be 0)")
    n = ids.shape[1]
    if family.pos_from_pad:  # RoBERTa: positions count non-padding tokens from pad + 1
        pad = int(model.config.pad_token_id)
        keep = ids.ne(pad).int()
        pos = (torch.cumsum(keep, dim=1).type_as(keep) * keep).long() + pad
    else:
        pos = torch.arange(n, device=ids.device)[None]
    h = embed_tokens(ids)
    assert family.type_embed is not None and family.embed_norm is not None
    types = get_path(model, family.type_embed)
    h = h + types(torch.zeros_like(ids))
    h = h + pos_embed(pos)
    norm = get_path(model, family.embed_norm)
    return torch.nn.functional.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


__all__ = ["check_head", "embed", "encoder_dims"]
