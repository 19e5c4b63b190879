"""A zero baseline gap (clean metric = corrupt metric) is refused before the sweep, unless asked.

The model is a tiny Llama whose attention and MLP outputs are zeroed, so the logits at the last
position depend on the last token only: IOI prompts, which differ earlier and end in the same
token, get exactly equal clean and corrupt metrics. With its blocks intact the same task has a
gap (the check is not vacuous).
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from patchtrace import SiteSpec, activation_patching, make_task
from patchtrace.metrics import BaselineWarning
from patchtrace.tasks.base import TaskError


def _blind(model):
    with torch.no_grad():
        for name, p in model.hf.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
    return model


def test_zero_gap_is_refused_naming_the_examples(smol_tokenizer):
    model = _blind(make_tiny("llama", seed=3, tokenizer=smol_tokenizer))
    task = make_task("ioi", n=2, seed=0)
    spec = SiteSpec("resid_pre", layers=(0,))
    with pytest.raises(TaskError, match=r"example\(s\) 0, 1 have a zero baseline gap.*--allow-degenerate"):
        activation_patching(model, task.tokenize(model.tokenizer), spec)
    with pytest.warns(BaselineWarning, match=r"example\(s\) 0, 1 have a zero baseline gap"):
        s = activation_patching(model, task.tokenize(model.tokenizer, allow_degenerate=True), spec)
    assert s.baselines["clean"] == s.baselines["corrupt"]


def test_a_model_that_reads_the_prompt_has_a_gap(smol_tokenizer):
    model = make_tiny("llama", seed=3, tokenizer=smol_tokenizer)
    s = activation_patching(model, make_task("ioi", n=2, seed=0).tokenize(model.tokenizer),
                            SiteSpec("resid_pre", layers=(0,)))
    assert abs(s.baselines["clean"] - s.baselines["corrupt"]) > 1e-4
