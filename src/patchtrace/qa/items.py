"""The extractive-QA data model: one :class:`QAItem` per question, context and answer.

A context-augmented LM can answer from the context it is given or from what it memorised. An item
records everything needed to probe that choice without searching any text later: the context as a
tuple of one-fact sentences, the index of the sentence that holds the answer (the *gold source*), the
answer as the next token's text, the closed-book (memory) answer when there is one, and the
answer's lead-in that the prompt prefills (:mod:`patchtrace.qa.prompts`).

Three kinds are generated (:mod:`patchtrace.qa.generators`): ``agree`` (the context states the true
fact), ``conflict`` (a counterfactual) and ``nomemory`` (a made-up entity: only the context can
answer). User data may use any label. JSON I/O is in :mod:`patchtrace.qa.io`.

Example:
    >>> it = QAItem(("The capital of France is Lyon.", "The capital of Spain is Madrid."),
    ...             "What is the capital of France?", "The capital of France is", " Lyon", 0, "conflict", " Paris")
    >>> it.context
    'The capital of France is Lyon. The capital of Spain is Madrid.'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from patchtrace.tasks.base import TaskError

Kind = Literal["agree", "conflict", "nomemory"]
KINDS: tuple[str, ...] = ("agree", "conflict", "nomemory")


@dataclass(frozen=True)
class QAItem:
    """One extractive-QA example.

    Attributes:
        sentences: the context, one fact per sentence (joined with single spaces).
        question: the question (user turn).
        prefix: the answer's lead-in, prefilled in the assistant turn ("The capital of France is").
        answer: the context answer as the next token's text, with its leading space (" Lyon").
        gold: index into ``sentences`` of the answer's source sentence.
        kind: ``agree`` / ``conflict`` / ``nomemory`` (or any label for user data).
        memory: the closed-book answer (" Paris") when known; None for made-up entities.
        subject: what the question is about ("France").
        meta: free-form fields (kept in provenance and JSON).
    """

    sentences: tuple[str, ...]
    question: str
    prefix: str
    answer: str
    gold: int
    kind: str = "custom"
    memory: str | None = None
    subject: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.sentences:
            raise TaskError(f"QA item about {self.subject or self.question!r}: the context has no sentences")
        if not 0 <= self.gold < len(self.sentences):
            raise TaskError(
                f"QA item about {self.subject or self.question!r}: gold sentence index {self.gold} is out of "
                f"range for a context of {len(self.sentences)} sentences"
            )

    @property
    def context(self) -> str:
        """The context text: the sentences joined by single spaces."""
        return " ".join(self.sentences)

    def replace_sentence(self, i: int, text: str) -> QAItem:
        """A copy with sentence ``i`` replaced (gold index unchanged)."""
        s = list(self.sentences)
        s[i] = text
        return QAItem(tuple(s), self.question, self.prefix, self.answer, self.gold, self.kind, self.memory, self.subject, dict(self.meta))

    def without_sentence(self, i: int) -> tuple[str, ...]:
        """The context sentences with sentence ``i`` removed."""
        return self.sentences[:i] + self.sentences[i + 1 :]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["sentences"] = list(self.sentences)
        return d

    @staticmethod
    def from_json(rec: dict[str, Any], where: str = "record") -> QAItem:
        """Build from a JSON record (see :func:`patchtrace.qa.io.load_qa_jsonl` for the fields).

        Raises:
            TaskError: a missing or mistyped field, naming ``where``.
        """
        need = ("sentences", "question", "answer", "gold")
        missing = [k for k in need if k not in rec]
        if missing:
            raise TaskError(f"{where}: missing field(s) {', '.join(missing)} (need {', '.join(need)}; optional "
                            "prefix, kind, memory, subject)")
        sents = rec["sentences"]
        if not isinstance(sents, list) or not all(isinstance(s, str) and s.strip() for s in sents):
            raise TaskError(f"{where}: 'sentences' must be a list of non-empty strings")
        if not isinstance(rec["gold"], int) or isinstance(rec["gold"], bool):
            raise TaskError(f"{where}: 'gold' must be an integer sentence index, got {rec['gold']!r}")
        known = {"sentences", "question", "answer", "gold", "prefix", "kind", "memory", "subject", "meta"}
        meta = dict(rec.get("meta") or {})
        meta.update({k: v for k, v in rec.items() if k not in known})
        return QAItem(
            tuple(sents), str(rec["question"]), str(rec.get("prefix", "")), str(rec["answer"]), rec["gold"],
            str(rec.get("kind", "custom")), None if rec.get("memory") is None else str(rec["memory"]),
            str(rec.get("subject", "")), meta,
        )
