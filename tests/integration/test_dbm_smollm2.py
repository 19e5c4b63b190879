"""DBM on the real SmolLM2: the variable-binding generator keeps only solved items, and a short mask
run reports accuracies that agree with what the desiderata mean."""

from __future__ import annotations

import pytest
import torch

from patchtrace.desiderata import tokenize_desiderata
from patchtrace.methods import dbm
from patchtrace.sites import SiteSpec
from patchtrace.tasks import make_task
from patchtrace.tasks.filtering import greedy_next_tokens
from patchtrace.tasks.variable_binding import (
    VariableBindingTask,
    desiderata_from_variable_binding,
    solved,
    variable_binding_task,
)

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def vb(smollm2):
    return variable_binding_task(8, 0, smollm2, shots=1)  # 1-shot: shorter prompts, a faster test


def test_make_task_discovers_the_generator():
    t = make_task("variable-binding", n=3, seed=2)
    assert t.name == "variable_binding" and len(t) == 3 and isinstance(t, VariableBindingTask)


def test_generator_keeps_only_solved_items(smollm2, vb):
    assert len(vb) == 8 and vb.params["n_solved"] == 8 and vb.params["n_generated"] >= 8
    value, op = desiderata_from_variable_binding(vb)
    tv, to = tokenize_desiderata([value, op], smollm2.tokenizer)
    with torch.no_grad():
        for td, want in ((tv, "contrast"), (to, "target")):
            for which, expect in (("original", getattr(td, want)), ("alternate", td.target)):
                ids = td.ids(which, range(len(td)))  # type: ignore[arg-type]
                pred = smollm2.runner.forward(ids, last_only=True).logits[:, -1].argmax(-1)
                assert torch.equal(pred, expect), (td.name, which)


def test_batched_answers_with_shared_prefix_match_one_forward_per_prompt(smollm2, vb):
    """The few-shot prefix is shared, so the helper runs it once; answers equal one HF forward each."""
    tok = smollm2.tokenizer
    prompts = [tok(e.clean).input_ids for e in vb.examples[:4]] + [tok(e.corrupt).input_ids for e in vb.examples[:4]]
    with torch.no_grad():
        want = [int(smollm2.hf(input_ids=torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]
    assert greedy_next_tokens(smollm2, prompts) == want
    answers = [int(e.answer) for e in vb.examples[:4]]
    wrong = [int(e.wrong) for e in vb.examples[:4]]
    assert solved(smollm2, [e.clean for e in vb.examples[:4]], answers) == [True] * 4
    assert solved(smollm2, [e.clean for e in vb.examples[:4]], wrong) == [False] * 4


def test_short_mask_run_accuracies_mean_what_they_say(smollm2, vb):
    cfg = dbm.DBMConfig(lam=0.05, steps=3, baseline=False)
    mask = dbm.run(smollm2, vb, [SiteSpec("head", per_unit=True, layers=tuple(range(20, 30)))], cfg)
    ev = mask.evaluation
    # unpatched: the original answer is never the value target and always the invariance target
    assert ev["unpatched_per_desideratum"] == {"value_dependence": 0.0, "operation_invariance": 1.0}
    assert mask.to_scores()["head"].values.shape == (10, smollm2.dims.n_heads)
    assert ev["n_components"] == 90 and len(mask.history["loss"]) == 3
