"""Tasks: what behaviour to localize, as (clean, corrupt, answer, wrong answer) examples.

A :class:`Task` is plain data (strings); :meth:`Task.tokenize` turns it into a :class:`TokenizedTask`
and validates *everything* before any compute happens: clean and corrupt prompts must tokenize to the
same length (position-wise patching needs aligned positions), every answer must be a single token
(or the caller chooses ``first_token=True`` explicitly), and the task must not be empty. A failure
raises :class:`TaskError` naming the example index and the offending tokens.

Examples may have different lengths from each other; the engine batches equal-length examples together.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from patchtrace.errors import PatchtraceError, PatchtraceWarning
from patchtrace.tokens import display_token, display_tokens


class TaskError(PatchtraceError, ValueError):
    """Invalid task data; the message names the example and the tokens at fault."""


class TaskWarning(PatchtraceWarning):
    """Task data that runs but may not mean what was intended (the message names the examples)."""


def _few(indices: Sequence[int], n: int = 8) -> str:
    """``0, 3, 5`` or ``0, 3, 5, ... (12 in all)``."""
    head = ", ".join(str(i) for i in indices[:n])
    return head if len(indices) <= n else f"{head}, ... ({len(indices)} in all)"


def _as_tuple(x: str | Sequence[str]) -> tuple[str, ...]:
    return (x,) if isinstance(x, str) else tuple(x)


@dataclass(frozen=True)
class Example:
    """One contrastive example.

    Attributes:
        clean: the prompt on which the model shows the behaviour.
        corrupt: the minimally different prompt on which it does not.
        answer: the clean prompt's correct next token(s) (several = any of them counts).
        wrong: the contrasting token(s), usually the corrupt prompt's answer.
        meta: free-form fields (template, names, ...), kept in provenance.
    """

    clean: str
    corrupt: str
    answer: str | tuple[str, ...]
    wrong: str | tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["answer"] = list(_as_tuple(self.answer)) if not isinstance(self.answer, str) else self.answer
        d["wrong"] = list(_as_tuple(self.wrong)) if not isinstance(self.wrong, str) else self.wrong
        return d


@dataclass
class Task:
    """A named list of examples plus the parameters that generated it.

    Example:
        >>> t = Task("toy", [Example("A B", "A C", " x", " y")])
        >>> len(t)
        1
    """

    name: str
    examples: list[Example]
    params: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    def hash(self) -> str:
        """SHA-256 (16 hex digits) of the examples' JSON: identifies the data in provenance."""
        blob = json.dumps([e.to_json() for e in self.examples], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def subset(self, indices: Sequence[int]) -> Task:
        """A task with only these examples (same name, params and type: subclasses stay subclasses)."""
        return replace(self, examples=[self.examples[i] for i in indices], params=dict(self.params))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n": len(self), "hash": self.hash(), "params": self.params}

    def tokenize(self, tokenizer: Any, *, first_token: bool = False, allow_degenerate: bool = False) -> TokenizedTask:
        """Tokenize and validate all examples.

        Besides lengths and single-token answers, two kinds of example make a patching result
        meaningless and are refused: an answer token set equal to the wrong one (a logit difference of
        zero by construction) and a clean prompt identical to the corrupt one (nothing to patch). An
        answer written without its leading space after a prompt that does not end in one (``"Paris"``
        where the model would continue with ``" Paris"``) scores a different token than the prompt's
        natural continuation: that is allowed, with a :class:`TaskWarning` naming the examples and
        both tokens.

        Args:
            tokenizer: a Hugging Face tokenizer.
            first_token: for multi-token answers, use their first token (explicit opt-in);
                otherwise a multi-token answer is an error.
            allow_degenerate: run degenerate examples anyway (a :class:`TaskWarning` names them).

        Raises:
            TaskError: empty task, length mismatch, multi-token answer or a degenerate example
                (names the example).
        """
        if tokenizer is None:
            raise TaskError("this model has no tokenizer; pass token ids or load a model with one")
        if not self.examples:
            raise TaskError(f"task {self.name!r} has no examples")
        clean_ids: list[list[int]] = []
        corrupt_ids: list[list[int]] = []
        answers: list[list[int]] = []
        wrongs: list[list[int]] = []
        for i, ex in enumerate(self.examples):
            c = tokenizer(ex.clean).input_ids
            k = tokenizer(ex.corrupt).input_ids
            if len(c) != len(k):
                ct = display_tokens(tokenizer.convert_ids_to_tokens(c))  # decoded, ␣ = leading space
                kt = display_tokens(tokenizer.convert_ids_to_tokens(k))
                raise TaskError(
                    f"example {i}: clean prompt has {len(c)} tokens but corrupt has {len(k)}; "
                    f"position-wise patching needs equal lengths.\n  clean:   {ct}\n  corrupt: {kt}"
                )
            if len(c) == 0:
                raise TaskError(f"example {i}: empty prompt")
            clean_ids.append(c)
            corrupt_ids.append(k)
            answers.append(self._answer_ids(tokenizer, i, "answer", _as_tuple(ex.answer), first_token))
            wrongs.append(self._answer_ids(tokenizer, i, "wrong", _as_tuple(ex.wrong), first_token))
        self._check_degenerate(clean_ids, corrupt_ids, answers, wrongs, allow_degenerate)
        self._check_leading_space(tokenizer, answers)
        na, nw = {len(a) for a in answers}, {len(w) for w in wrongs}
        if len(na) > 1 or len(nw) > 1:
            raise TaskError(
                "all examples must have the same number of answer tokens and of wrong tokens "
                f"(got answer counts {sorted(na)}, wrong counts {sorted(nw)})"
            )
        return TokenizedTask(
            task=self,
            clean=clean_ids,
            corrupt=corrupt_ids,
            answer=torch.tensor(answers, dtype=torch.long),
            wrong=torch.tensor(wrongs, dtype=torch.long),
            tokens=[tokenizer.convert_ids_to_tokens(c) for c in clean_ids],
            corrupt_tokens=[tokenizer.convert_ids_to_tokens(k) for k in corrupt_ids],
            allow_degenerate=allow_degenerate,
            mask_token_id=getattr(tokenizer, "mask_token_id", None),
            mask_token=getattr(tokenizer, "mask_token", None),
        )

    def _check_degenerate(
        self, clean: list[list[int]], corrupt: list[list[int]], answers: list[list[int]], wrongs: list[list[int]],
        allow: bool,
    ) -> None:
        same_answer = [i for i, (a, w) in enumerate(zip(answers, wrongs, strict=True)) if set(a) == set(w)]
        same_prompt = [i for i, (c, k) in enumerate(zip(clean, corrupt, strict=True)) if c == k]
        problems = []
        if same_answer:
            ex = self.examples[same_answer[0]]
            problems.append(
                f"example(s) {_few(same_answer)} score the same token(s) as answer and wrong "
                f"(example {same_answer[0]}: answer {ex.answer!r}, wrong {ex.wrong!r}), so every logit "
                "difference is zero by construction"
            )
        if same_prompt:
            problems.append(
                f"example(s) {_few(same_prompt)} have identical clean and corrupt prompts "
                f"(example {same_prompt[0]}: {self.examples[same_prompt[0]].clean!r}), so there is nothing to patch"
            )
        if not problems:
            return
        msg = f"task {self.name!r}: " + "; ".join(problems)
        if not allow:
            raise TaskError(msg + "; fix or drop them (or run them anyway: allow_degenerate=True in Python, "
                            "--allow-degenerate on `patchtrace patch`)")
        warnings.warn(msg + " (running anyway: allow_degenerate=True)", TaskWarning, stacklevel=3)

    def _check_leading_space(self, tok: Any, answers: list[list[int]]) -> None:
        odd: list[str] = []
        idx: list[int] = []
        for i, ex in enumerate(self.examples):
            text = _as_tuple(ex.answer)[0]
            if not text or text[0].isspace() or not ex.clean or ex.clean[-1].isspace():
                continue
            spaced = tok(" " + text, add_special_tokens=False).input_ids
            if len(spaced) == 1 and spaced[0] != answers[i][0]:  # " 8" → ["Ġ", "8"]: digits carry no space
                idx.append(i)
                if len(odd) < 2:
                    odd.append(
                        f"example {i} scores {display_token(tok.convert_ids_to_tokens(answers[i][:1])[0])!r} "
                        f"(answer {text!r}) where the prompt would continue with "
                        f"{display_token(tok.convert_ids_to_tokens(spaced[:1])[0])!r}"
                    )
        if idx:
            warnings.warn(
                f"task {self.name!r}: the answer of example(s) {_few(idx)} has no leading space although the "
                f"prompt does not end in one: {'; '.join(odd)}. Write the answer as ' {_as_tuple(self.examples[idx[0]].answer)[0]}' "
                "if that is the continuation you mean",
                TaskWarning,
                stacklevel=3,
            )

    @staticmethod
    def _answer_ids(tok: Any, i: int, what: str, texts: tuple[str, ...], first_token: bool) -> list[int]:
        if not texts:
            raise TaskError(f"example {i}: no {what} token given")
        out = []
        for t in texts:
            ids = tok(t, add_special_tokens=False).input_ids
            if len(ids) == 0:
                raise TaskError(f"example {i}: {what} {t!r} tokenizes to nothing")
            if len(ids) > 1 and not first_token:
                raise TaskError(
                    f"example {i}: {what} {t!r} is {len(ids)} tokens {display_tokens(tok.convert_ids_to_tokens(ids))}; "
                    "answers must be single tokens (or pass first_token=True to score the first token)"
                )
            out.append(ids[0])
        return out


@dataclass
class TokenizedTask:
    """A validated, tokenized task.

    Attributes:
        task: the source task.
        clean, corrupt: token ids per example (equal lengths within an example).
        answer: ``[N, A]`` answer token ids; wrong: ``[N, W]`` wrong-answer token ids.
        tokens, corrupt_tokens: token strings per example (for labels in reports).
        allow_degenerate: the user asked to run degenerate examples (``tokenize(allow_degenerate=True)``);
            methods that find more of them once they run the model (a zero baseline gap) then warn
            instead of refusing.
        mask_token_id, mask_token: the tokenizer's mask token (None: it has none); a masked LM reads
            its answer there (:meth:`readout`).
    """

    task: Task
    clean: list[list[int]]
    corrupt: list[list[int]]
    answer: Tensor
    wrong: Tensor
    tokens: list[list[str]]
    corrupt_tokens: list[list[str]]
    allow_degenerate: bool = False
    mask_token_id: int | None = None
    mask_token: str | None = None

    def __len__(self) -> int:
        return len(self.clean)

    def readout(self, indices: Sequence[int], *, mask: bool) -> Tensor | None:
        """Where the metric reads the logits of these examples: None (the last position, a causal LM)
        or, with ``mask`` (a masked LM), ``[len(indices)]`` absolute positions of each prompt's one
        mask token, which need not be the last position.

        Raises:
            TaskError: a tokenizer without a mask token, or an example whose clean or corrupt prompt
                has no mask token or several, or has it at different positions (names the example).
        """
        if not mask:
            return None
        if self.mask_token_id is None:
            raise TaskError(f"task {self.task.name!r}: a masked LM reads its answer at the mask token, but this "
                            "tokenizer has none")
        out = []
        for i in indices:
            where = []
            for name, ids in (("clean", self.clean[i]), ("corrupt", self.corrupt[i])):
                at = [t for t, x in enumerate(ids) if x == self.mask_token_id]
                if len(at) != 1:
                    raise TaskError(
                        f"example {i}: the {name} prompt has {'no' if not at else len(at)} mask token"
                        f"{'s' if len(at) > 1 else ''} {self.mask_token!r}; a masked LM reads its answer at exactly "
                        f"one (write the prompt with one {self.mask_token} where the answer goes)"
                    )
                where.append(at[0])
            if where[0] != where[1]:
                raise TaskError(f"example {i}: the mask token is at position {where[0]} of the clean prompt but "
                                f"{where[1]} of the corrupt one; the readout must be one position")
            out.append(where[0])
        return torch.tensor(out, dtype=torch.long)

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.clean]

    def uniform_length(self) -> int | None:
        """The common sequence length, or None if examples differ in length."""
        ls = set(self.lengths)
        return ls.pop() if len(ls) == 1 else None

    def groups(self) -> list[list[int]]:
        """Example indices grouped by sequence length (each group runs as one batch, no padding)."""
        by: dict[int, list[int]] = {}
        for i, n in enumerate(self.lengths):
            by.setdefault(n, []).append(i)
        return [by[n] for n in sorted(by)]

    def scored_tokens(self, tokenizer: Any, i: int = 0) -> tuple[list[str], list[str]]:
        """The answer and wrong tokens that the metric scores for example ``i`` (as token strings)."""
        return (
            tokenizer.convert_ids_to_tokens(self.answer[i].tolist()),
            tokenizer.convert_ids_to_tokens(self.wrong[i].tolist()),
        )

    def ids(self, which: str, indices: Sequence[int]) -> Tensor:
        """``[len(indices), T]`` ids of ``which`` (``"clean"`` or ``"corrupt"``) for equal-length examples."""
        src = self.clean if which == "clean" else self.corrupt
        return torch.tensor([src[i] for i in indices], dtype=torch.long)
