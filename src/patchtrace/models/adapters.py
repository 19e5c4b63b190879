"""Architecture adapters: one small declarative table per model family.

patchtrace runs its own forward pass (:mod:`patchtrace.models.runner`) over the Hugging Face module
weights, so that every site is a named tensor rather than a hook guess, and so that the fast engine
can start at any layer and any position. What differs between families is written down here, as
data: where the modules live, how Q/K/V are packed, which norm, whether blocks are parallel, whether
the sublayer outputs pass through a norm of their own before the residual add ("post-norm" or
sandwich blocks, Gemma 3), and whether rotary tables differ per layer type (Gemma 3's local/global
layers). Encoders (BERT, RoBERTa) add bidirectional attention, norms after the residual adds and an MLM
head (:mod:`patchtrace.models.encoder`).

Dimensions come from typed functions of the HF config (:class:`Dims`). A config field that changes
the computation and that the runner does not implement is refused loudly
(:class:`UnsupportedModelError`), never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from patchtrace.errors import PatchtraceError

QKVLayout = Literal["separate", "gpt2_fused", "neox_fused"]
NormKind = Literal["rms", "rms_gemma", "layer"]


class UnsupportedModelError(PatchtraceError, ValueError):
    """The architecture (or a config option of it) is not one patchtrace implements."""


@dataclass(frozen=True)
class Family:
    """Where a family keeps its modules, and how its blocks compute.

    Paths are attribute paths relative to the causal-LM model (``model.model.layers`` ...); per-layer
    paths are relative to one block.
    """

    name: str
    model_types: tuple[str, ...]
    embed: str
    pos_embed: str | None
    layers: str
    ln1: str
    ln2: str
    attn: str
    qkv: QKVLayout
    q: str
    k: str
    v: str
    o: str
    mlp: str
    gated: bool
    mlp_in: str
    mlp_gate: str | None
    mlp_out: str
    final_norm: str
    norm: NormKind
    rotary: str | None
    qk_norm: tuple[str, str] | None = None
    conv1d: bool = False
    post_attn_norm: str | None = None
    post_mlp_norm: str | None = None
    rope_by_layer_type: bool = False
    moe_router: str | None = None
    moe_experts: str | None = None
    # encoders (BERT, RoBERTa; see patchtrace.models.encoder): bidirectional attention, norms after the
    # residual adds (attention, MLP; ln1/ln2 are then "": no input norms), embeddings with token types
    # and a LayerNorm, RoBERTa's padding-based positions, and the MLM head's dense (+ act) before final_norm
    causal: bool = True
    post_ln: tuple[str, str] | None = None
    type_embed: str | None = None
    embed_norm: str | None = None
    pos_from_pad: bool = False
    head_dense: str | None = None
    head_act: str | None = None

    @property
    def moe(self) -> bool:
        """Whether the MLP is a mixture of experts (see :mod:`patchtrace.models.moe`)."""
        return self.moe_router is not None

    @property
    def post_norms(self) -> bool:
        """Whether a norm sits between a sublayer's output and the residual stream: the outputs are
        normalised before the add (sandwich blocks, Gemma 3) or the sums after it (post-norm encoders,
        BERT). Either way one component's additive term in the stream is not defined."""
        return self.post_attn_norm is not None or self.post_ln is not None


LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),  # qwen3 has its own table (QK norms)
    embed="model.embed_tokens",
    pos_embed=None,
    layers="model.layers",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    attn="self_attn",
    qkv="separate",
    q="q_proj",
    k="k_proj",
    v="v_proj",
    o="o_proj",
    mlp="mlp",
    gated=True,
    mlp_in="up_proj",
    mlp_gate="gate_proj",
    mlp_out="down_proj",
    final_norm="model.norm",
    norm="rms",
    rotary="model.rotary_emb",
)

QWEN3 = Family(**{**LLAMA.__dict__, "name": "qwen3", "model_types": ("qwen3",), "qk_norm": ("q_norm", "k_norm")})

GEMMA = Family(**{**LLAMA.__dict__, "name": "gemma", "model_types": ("gemma",), "norm": "rms_gemma"})

# Gemma 3 text: sandwich norms. ``ln2`` is the norm *entering* the MLP (HF's pre_feedforward_layernorm);
# HF's post_attention_layernorm normalises the attention output before the residual add.
GEMMA3 = Family(
    **{
        **GEMMA.__dict__,
        "name": "gemma3",
        "model_types": ("gemma3_text",),
        "ln2": "pre_feedforward_layernorm",
        "qk_norm": ("q_norm", "k_norm"),
        "post_attn_norm": "post_attention_layernorm",
        "post_mlp_norm": "post_feedforward_layernorm",
        "rope_by_layer_type": True,
    }
)

# Mixtral: Mistral attention; the MLP is a top-k mixture of experts with a linear router
# (``mlp.gate``) and experts stored as 3-D tensors (``mlp.experts.gate_up_proj`` / ``down_proj``).
MIXTRAL = Family(
    **{**LLAMA.__dict__, "name": "mixtral", "model_types": ("mixtral",), "moe_router": "gate", "moe_experts": "experts"}
)

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    embed="transformer.wte",
    pos_embed="transformer.wpe",
    layers="transformer.h",
    ln1="ln_1",
    ln2="ln_2",
    attn="attn",
    qkv="gpt2_fused",
    q="c_attn",
    k="c_attn",
    v="c_attn",
    o="c_proj",
    mlp="mlp",
    gated=False,
    mlp_in="c_fc",
    mlp_gate=None,
    mlp_out="c_proj",
    final_norm="transformer.ln_f",
    norm="layer",
    rotary=None,
    conv1d=True,
)

NEOX = Family(
    name="gpt_neox",
    model_types=("gpt_neox",),
    embed="gpt_neox.embed_in",
    pos_embed=None,
    layers="gpt_neox.layers",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    attn="attention",
    qkv="neox_fused",
    q="query_key_value",
    k="query_key_value",
    v="query_key_value",
    o="dense",
    mlp="mlp",
    gated=False,
    mlp_in="dense_h_to_4h",
    mlp_gate=None,
    mlp_out="dense_4h_to_h",
    final_norm="gpt_neox.final_layer_norm",
    norm="layer",
    rotary="gpt_neox.rotary_emb",
)

# BERT (BertForMaskedLM): post-norm encoder blocks; the MLM head's transform (dense, act, LayerNorm)
# plays the final norm, and its decoder (tied to the word embeddings) is the unembedding.
BERT = Family(
    name="bert",
    model_types=("bert",),
    embed="bert.embeddings.word_embeddings",
    pos_embed="bert.embeddings.position_embeddings",
    layers="bert.encoder.layer",
    ln1="",
    ln2="",
    attn="attention",
    qkv="separate",
    q="self.query",
    k="self.key",
    v="self.value",
    o="output.dense",
    mlp="",
    gated=False,
    mlp_in="intermediate.dense",
    mlp_gate=None,
    mlp_out="output.dense",
    final_norm="cls.predictions.transform.LayerNorm",
    norm="layer",
    rotary=None,
    causal=False,
    post_ln=("attention.output.LayerNorm", "output.LayerNorm"),
    type_embed="bert.embeddings.token_type_embeddings",
    embed_norm="bert.embeddings.LayerNorm",
    head_dense="cls.predictions.transform.dense",
)

# RoBERTa (RobertaForMaskedLM): BERT's blocks; positions from pad_token_id + 1; the head's act is always gelu.
ROBERTA = Family(
    **{
        **BERT.__dict__,
        "name": "roberta",
        "model_types": ("roberta",),
        "embed": "roberta.embeddings.word_embeddings",
        "pos_embed": "roberta.embeddings.position_embeddings",
        "layers": "roberta.encoder.layer",
        "final_norm": "lm_head.layer_norm",
        "type_embed": "roberta.embeddings.token_type_embeddings",
        "embed_norm": "roberta.embeddings.LayerNorm",
        "pos_from_pad": True,
        "head_dense": "lm_head.dense",
        "head_act": "gelu",
    }
)

FAMILIES: tuple[Family, ...] = (QWEN3, GEMMA3, GEMMA, MIXTRAL, LLAMA, GPT2, NEOX, BERT, ROBERTA)


def supported_model_types() -> list[str]:
    """The HF ``model_type`` values patchtrace can run, sorted."""
    return sorted({t for f in FAMILIES for t in f.model_types})


@dataclass(frozen=True)
class Dims:
    """Typed dimensions of a model, read from its HF config.

    Attributes:
        attn_scale: the factor on ``q·k`` (``d_head^-½``; Gemma 3: ``query_pre_attn_scalar^-½``).
        sliding_window: the smallest attention window of any layer (None: every layer is global).
        layer_windows: per layer, how many positions a query sees (itself included), None = all.
        layer_types: per layer, the HF layer type naming its rotary table (``full_attention`` ...).
        final_softcap: ``c`` of the final logit soft-cap ``c·tanh(logits / c)``, None = off.
    """

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    vocab: int
    parallel_residual: bool
    act: str
    attn_scale: float
    sliding_window: int | None
    layer_windows: tuple[int | None, ...] = ()
    layer_types: tuple[str, ...] = ()
    final_softcap: float | None = None
    n_experts: int = 0
    top_k: int = 0

    def window(self, layer: int | None) -> int | None:
        """The attention window of ``layer`` (None: global causal attention, or no layer)."""
        return self.layer_windows[layer] if self.layer_windows and layer is not None else None


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def family_for(config: Any) -> Family:
    """Pick the family table for an HF config, or refuse with the list of supported types."""
    mt = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if mt in fam.model_types:
            return fam
    raise UnsupportedModelError(
        f"architecture {mt!r} ({', '.join(getattr(config, 'architectures', None) or ['?'])}) is not supported; "
        f"supported model types: {', '.join(supported_model_types())}"
    )


def _gpt2_dims(config: Any) -> Dims:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(config, flag, False):
            raise UnsupportedModelError(f"gpt2 option {flag}=True is not implemented")
    if not getattr(config, "scale_attn_weights", True):
        raise UnsupportedModelError("gpt2 option scale_attn_weights=False is not implemented")
    d = config.n_embd
    h = config.n_head
    return Dims(
        n_layers=config.n_layer,
        d_model=d,
        n_heads=h,
        n_kv_heads=h,
        d_head=d // h,
        d_mlp=config.n_inner or 4 * d,
        vocab=config.vocab_size,
        parallel_residual=False,
        act=config.activation_function,
        attn_scale=(d // h) ** -0.5,
        sliding_window=None,
    )


def _refuse_gemma_options(config: Any, family: Family) -> None:
    """Gemma-specific options the runner does not compute, refused by name."""
    if family.name == "gemma" and getattr(config, "final_logit_softcapping", None):
        raise UnsupportedModelError("gemma option final_logit_softcapping is not implemented for Gemma 1/2")
    if getattr(config, "attn_logit_softcapping", None):
        # transformers' Gemma3Attention does not apply it either; refusing beats guessing
        raise UnsupportedModelError(f"{config.model_type} option attn_logit_softcapping is not implemented")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"{config.model_type} option use_bidirectional_attention=True is not implemented")


def _windows(config: Any, n_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding windows, read the way transformers builds its masks.

    A ``layer_types`` list (Qwen2/3, Gemma 3) windows exactly its ``sliding_attention`` layers;
    Mistral (no layer types) windows every layer when ``sliding_window`` is set.
    """
    raw = getattr(config, "sliding_window", None)
    window = int(raw) if raw else None
    types = getattr(config, "layer_types", None)
    if types:
        if len(types) < n_layers:
            raise UnsupportedModelError(f"{config.model_type}: layer_types lists {len(types)} of {n_layers} layers")
        for t in set(types) - {"full_attention", "sliding_attention"}:
            raise UnsupportedModelError(f"{config.model_type}: layer type {t!r} is not implemented")
        if "sliding_attention" in types and not window:
            raise UnsupportedModelError(f"{config.model_type}: sliding_attention layers without a sliding_window")
        return tuple(window if t == "sliding_attention" else None for t in types[:n_layers])
    if config.model_type in ("mistral", "mixtral") and window:
        return (window,) * n_layers
    if getattr(config, "use_sliding_window", False) and window:
        raise UnsupportedModelError(f"{config.model_type}: use_sliding_window without layer_types is not implemented")
    return (None,) * n_layers


def dims_for(config: Any, family: Family) -> Dims:
    """Read the dimensions, refusing config options the runner does not implement."""
    mt = config.model_type
    if family.name == "gpt2":
        return _gpt2_dims(config)
    if not family.causal:
        from patchtrace.models.encoder import encoder_dims

        return encoder_dims(config)
    d = config.hidden_size
    h = config.num_attention_heads
    dh = _get(config, "head_dim", default=d // h)
    scale = dh**-0.5
    if family.name in ("gemma", "gemma3"):
        act = _get(config, "hidden_activation", "hidden_act")
        _refuse_gemma_options(config, family)
        if family.name == "gemma3":
            scale = float(config.query_pre_attn_scalar) ** -0.5
    else:
        act = config.hidden_act
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise UnsupportedModelError(f"{mt} option pretraining_tp={config.pretraining_tp} is not implemented")
    n_layers = config.num_hidden_layers
    windows = _windows(config, n_layers)
    present = [w for w in windows if w is not None]
    types = tuple(getattr(config, "layer_types", None) or ("full_attention",) * n_layers)[:n_layers]
    cap = getattr(config, "final_logit_softcapping", None) if family.name == "gemma3" else None
    n_experts, top_k = _moe_dims(config) if family.moe else (0, 0)
    return Dims(
        n_layers=n_layers,
        d_model=d,
        n_heads=h,
        n_kv_heads=_get(config, "num_key_value_heads", default=h),
        d_head=dh,
        d_mlp=config.intermediate_size,
        vocab=config.vocab_size,
        parallel_residual=bool(getattr(config, "use_parallel_residual", False)),
        act=act,
        attn_scale=scale,
        sliding_window=min(present) if present else None,
        layer_windows=windows,
        layer_types=types,
        final_softcap=float(cap) if cap else None,
        n_experts=n_experts,
        top_k=top_k,
    )


def _moe_dims(config: Any) -> tuple[int, int]:
    """(experts, experts per token) of a mixture-of-experts config, refusing what the runner lacks."""
    n, k = int(config.num_local_experts), int(config.num_experts_per_tok)
    if not 1 <= k <= n:
        raise UnsupportedModelError(f"{config.model_type} option num_experts_per_tok={k} with {n} experts")
    for flag in ("norm_topk_prob",):  # Mixtral always renormalises the top-k weights; other values are not it
        if getattr(config, flag, True) is False:
            raise UnsupportedModelError(f"{config.model_type} option {flag}=False is not implemented")
    return n, k


def get_path(root: Any, path: str) -> Any:
    """Follow a dotted attribute path (``model.layers``) from ``root`` (``""``: ``root`` itself)."""
    obj = root
    if not path:
        return obj
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
