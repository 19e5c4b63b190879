"""Tiny random BERT / RoBERTa masked LMs for the encoder tests (models and methods), built one way.

An 18-word WordPiece vocabulary, 3 layers, width 32, 4 heads. LayerNorms start at (1, 0), which
would hide a misplaced norm, so their weights and biases are drawn at random after construction.
"""

from __future__ import annotations

from typing import Any

import torch

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "capital", "of", "france", "italy", "is", "paris",
         "rome", "and", "in", "a", "city", "."]  # fmt: skip
FAMILIES = ("bert", "roberta")


def encoder_config(family: str, **over: Any) -> Any:
    """The tiny ``BertConfig`` / ``RobertaConfig``; ``over`` replaces any field."""
    from transformers import BertConfig, RobertaConfig

    cfg = BertConfig if family == "bert" else RobertaConfig
    kw = dict(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=40, initializer_range=0.2)  # fmt: skip
    return cfg(**{**kw, **over})


def tiny_encoder(family: str, seed: int = 0, **over: Any) -> Any:
    """A seeded ``BertForMaskedLM`` / ``RobertaForMaskedLM`` (eval mode) with random LayerNorm weights."""
    from transformers import BertForMaskedLM, RobertaForMaskedLM

    torch.manual_seed(seed)
    hf = (BertForMaskedLM if family == "bert" else RobertaForMaskedLM)(encoder_config(family, **over)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.3)
    return hf
