"""Variable binding (after Davies et al. 2023): retrieve the value a query refers to.

A short program binds single-digit values to single-letter variables, then binds a query variable to
one of them and asks for its value::

    a = 3
    b = 7
    c = a
    print(c)  # prints 3

Two desiderata (:mod:`patchtrace.desiderata`) test where the *value* travels at the last token:

- ``value_dependence`` (kind ``value``, weight 5 as in the paper): the alternate gives the referenced
  variable another value (``a = 5``); patched components must carry it: target = the alternate's
  answer (5), contrast = the original's (3).
- ``operation_invariance`` (kind ``invariance``, weight 1): the alternate changes the lookup
  *operation* (which variable the query reads, ``c = b``) while the retrieved value stays the same
  (``b`` now holds 3). The paper's operation switch changes ``+`` to ``−`` with the same values; here
  the "operation" is the reference, the analogue for a retrieval program. Components that carry the
  *value* are unaffected; components that carry the *reference* (which variable to read) would
  make the original run read ``b`` = 7. Target = the original's answer (3), contrast = 7.

Together they ask for components that carry the bound value and not the binding.

Token lengths: single digits, single-letter names in the same places, so original and alternates
tokenize to the same length (validated anyway). With a model, only items the model solves are kept
(original, value alternate and operation alternate all answered correctly at the last position);
``task.params`` records how many were generated and how many solved.

The returned :class:`VariableBindingTask` is a :class:`~patchtrace.tasks.Task` holding the value
pairs (clean = original, corrupt = value alternate, answer = original value, wrong = alternate value)
so every patching method can run on it; its :meth:`~VariableBindingTask.desiderata` (the same as
:func:`desiderata_from_variable_binding`) rebuilds both desiderata, which is how
:func:`patchtrace.desiderata.as_desiderata` (and so DBM) reads it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from patchtrace.desiderata import Desideratum, Triple
from patchtrace.tasks.base import Example, Task, TaskError
from patchtrace.tasks.filtering import greedy_next_tokens

if TYPE_CHECKING:
    from patchtrace.models.load import Model

NAMES = "abcdefghjkmnpqrstuvwxyz"

#: Prompt formats: how the bindings and the query are written (the query ends the prompt).
FORMATS: dict[str, dict[str, str]] = {
    "print": {"bind": "{v} = {x}\n", "ref": "{q} = {r}\n", "query": "print({q})  # prints "},
    "assert": {"bind": "{v} = {x}\n", "ref": "{q} = {r}\n", "query": "assert {q} == "},
    "direct": {"bind": "{v} = {x}\n", "ref": "", "query": "print({r})  # prints "},
}


def _program(fmt: dict[str, str], names: list[str], values: list[int], query: str, ref: int) -> str:
    s = "".join(fmt["bind"].format(v=v, x=x) for v, x in zip(names, values))
    s += fmt["ref"].format(q=query, r=names[ref])
    return s + fmt["query"].format(q=query, r=names[ref])


def _item(rng: random.Random, fmt: dict[str, str], n_vars: int) -> dict[str, Any]:
    letters = rng.sample(NAMES, n_vars + 1)
    names, query = letters[:n_vars], letters[n_vars]
    values = rng.sample(range(10), n_vars)
    ref = rng.randrange(n_vars)
    other = rng.choice([i for i in range(n_vars) if i != ref])
    new_val = rng.choice([x for x in range(10) if x not in values])
    v_vals = list(values)
    v_vals[ref] = new_val
    o_vals = list(values)
    o_vals[other] = values[ref]
    return {
        "original": _program(fmt, names, values, query, ref),
        "value_alt": _program(fmt, names, v_vals, query, ref),
        "op_alt": _program(fmt, names, o_vals, query, other),
        "answer": values[ref],
        "value_answer": new_val,
        "op_contrast": values[other],
        "meta": {"names": "".join(names), "query": query, "values": values, "ref": ref, "other": other},
    }


def _shots(rng: random.Random, fmt: dict[str, str], n_vars: int, k: int) -> str:
    out = ""
    for _ in range(k):
        it = _item(rng, fmt, n_vars)
        out += it["original"] + f"{it['answer']}\n\n"
    return out


def solved(model: Model, prompts: list[str], answers: list[int]) -> list[bool]:
    """Whether the model's greedy next token after each prompt is its answer digit.

    One batched pass (:func:`~patchtrace.tasks.filtering.greedy_next_tokens`): the few-shot prefix
    every prompt shares runs once and the programs run on its cached keys/values.
    """
    tok = model.tokenizer
    digit = [tok(str(d), add_special_tokens=False).input_ids[0] for d in range(10)]
    top = greedy_next_tokens(model, [tok(p).input_ids for p in prompts])
    return [t == digit[a] for t, a in zip(top, answers, strict=True)]


@dataclass
class VariableBindingTask(Task):
    """A variable-binding :class:`~patchtrace.tasks.Task` that knows its two desiderata.

    Examples carry the operation alternate in ``meta`` (``op_alternate``, ``op_contrast``); subsets
    keep the type (:meth:`Task.subset` copies with :func:`dataclasses.replace`).
    """

    def desiderata(self) -> list[Desideratum]:
        """``value_dependence`` and ``operation_invariance`` (:func:`desiderata_from_variable_binding`)."""
        return desiderata_from_variable_binding(self)


def variable_binding_task(
    n: int = 16,
    seed: int = 0,
    model: Model | None = None,
    *,
    fmt: str = "print",
    n_vars: int = 2,
    shots: int = 3,
    max_tries: int = 20,
) -> VariableBindingTask:
    """Generate ``n`` variable-binding items (the model solves all of them when ``model`` is given).

    Args:
        n: number of items wanted.
        seed: RNG seed.
        model: a :class:`~patchtrace.models.load.Model`; when given, only items it solves are kept.
        fmt: prompt format, one of :data:`FORMATS`.
        n_vars: number of bound variables (the query reads one of them).
        shots: solved example programs prefixed to every prompt (the same prefix for all items).
        max_tries: give up after generating ``max_tries · n`` candidates.

    Returns:
        A :class:`VariableBindingTask` of value pairs; ``params`` holds ``n_generated``,
        ``n_solved`` (None without a model) and the settings. Fewer than ``n`` items are returned
        when the model solves too few (the count says so).

    Raises:
        TaskError: unknown format or fewer than 2 variables.
    """
    if fmt not in FORMATS:
        raise TaskError(f"unknown variable-binding format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if n_vars < 2 or n_vars > 9:
        raise TaskError(f"n_vars must be in 2..9 (got {n_vars})")
    f = FORMATS[fmt]
    rng = random.Random(seed)
    prefix = _shots(random.Random(10_000 + seed), f, n_vars, shots)
    items: list[dict[str, Any]] = []
    generated = 0
    while len(items) < n and generated < max_tries * max(n, 1):
        batch = [_item(rng, f, n_vars) for _ in range(max(n, 16))]
        generated += len(batch)
        if model is not None:
            programs = [it[k] for it in batch for k in ("original", "value_alt", "op_alt")]
            answers = [it[k] for it in batch for k in ("answer", "value_answer", "answer")]
            ok = solved(model, [prefix + p for p in programs], answers)
            batch = [it for j, it in enumerate(batch) if all(ok[3 * j : 3 * j + 3])]
        items.extend(batch)
    items = items[:n]
    examples = [
        Example(
            prefix + it["original"], prefix + it["value_alt"], str(it["answer"]), str(it["value_answer"]),
            {**it["meta"], "op_alternate": prefix + it["op_alt"], "op_contrast": str(it["op_contrast"])},
        )
        for it in items
    ]
    return VariableBindingTask(
        "variable_binding",
        examples,
        {
            "n": n, "seed": seed, "format": fmt, "n_vars": n_vars, "shots": shots,
            "n_generated": generated if model is not None else len(examples),
            "n_solved": len(examples) if model is not None else None,
            "filtered_by": model.name if model is not None else None,
        },
        "variable binding: print the value a query variable is bound to; clean/corrupt differ in that value",
    )


def desiderata_from_variable_binding(task: Task) -> list[Desideratum]:
    """The ``value_dependence`` (weight 5) and ``operation_invariance`` (weight 1) desiderata of a task
    made by :func:`variable_binding_task` (see the module docstring).

    Raises:
        TaskError: the task lacks the operation alternates (not made by this module).
    """
    value, op = [], []
    for i, ex in enumerate(task.examples):
        if "op_alternate" not in ex.meta:
            raise TaskError(f"example {i} has no 'op_alternate' in meta; build the task with variable_binding_task")
        ans, wrong = str(ex.answer), str(ex.wrong)
        value.append(Triple(ex.clean, ex.corrupt, wrong, contrast=ans, meta={"i": i}))
        op.append(Triple(ex.clean, ex.meta["op_alternate"], ans, contrast=ex.meta["op_contrast"], meta={"i": i}))
    return [
        Desideratum("value_dependence", value, kind="value", weight=5.0,
                    description="alternate re-binds the referenced variable; target = alternate's value"),
        Desideratum("operation_invariance", op, kind="invariance", weight=1.0,
                    description="alternate reads another variable holding the same value; target = original's value"),
    ]


def variable_binding_desiderata(n: int = 16, seed: int = 0, model: Model | None = None, **kw: Any) -> list[Desideratum]:
    """Shortcut: :func:`variable_binding_task` then :func:`desiderata_from_variable_binding`."""
    return desiderata_from_variable_binding(variable_binding_task(n, seed, model, **kw))
