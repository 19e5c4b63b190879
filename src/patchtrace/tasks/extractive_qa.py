"""Extractive QA with a context that may agree with, contradict, or replace the model's memory.

A context-augmented LM can answer from the context it is given or from what it memorised. This
module builds small, fully-controlled probes of that choice (Basu et al., methods.md §6):

* ``agree``    — the context states the true fact ("The capital of France is Paris."), so context
  and memory give the same answer;
* ``conflict`` — the context states a counterfactual ("The capital of France is Lyon."); a
  context-faithful model says Lyon, a memory-faithful one Paris;
* ``nomemory`` — the fact is about a made-up entity ("The capital of Veldoria is Oslo."), so only
  the context can answer.

Every context is 3–5 one-sentence facts: one holds the answer (its index is the *gold source*), the
others are distractors of the same shape. Answers are single tokens (cities), so scoring is a
comparison of token ids.

Prompt format. SmolLM2-135M-Instruct is an instruct model, but asked an open question it rambles.
What makes it answer reliably is the chat template (system: "Answer the question using only the
context.") with the assistant turn *prefilled* by the answer's lead-in ("The capital of France
is"), so the next token is the answer. ``fmt="plain"`` renders ``Context: … Question: … Answer: …``
for tokenizers without a chat template. Measured on SmolLM2 (19 capitals it knows closed-book):
both formats answer 19/19 agreeing contexts; the instructed chat format follows 6/19 conflicting
contexts (plain: 7/19, chat without the system line: 1/19).

Sentence bookkeeping. :func:`render` builds the prompt string itself, so it knows the character
range of every context sentence; the tokenizer's offset mapping then assigns each token to the
sentence it overlaps most (a token like ``" The"`` that straddles the joining space goes to the
sentence it starts). Nothing is found by searching the text, so repeated or odd sentences are safe.

Patching. :func:`qa_patching_task` turns conflict items into a :class:`~patchtrace.tasks.base.Task`:
clean = the counterfactual context (the model copies "Lyon"), corrupt = the same prompt with the
answer sentence replaced by a distractor of the *same token length* (the model falls back to
memory, "Paris"); answer = the context answer, wrong = the memory answer.

Example:
    >>> items = make_qa_items("conflict", n=2, seed=0)
    >>> items[0].kind, len(items[0].sentences) >= 3
    ('conflict', True)
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from patchtrace.tasks.base import Example, Task, TaskError
from patchtrace.tasks.factual import CAPITALS
from patchtrace.tasks.io import iter_jsonl

Kind = Literal["agree", "conflict", "nomemory"]
KINDS: tuple[str, ...] = ("agree", "conflict", "nomemory")
Fmt = Literal["chat", "plain"]

SYSTEM = "Answer the question using only the context."
#: Cities used as counterfactual or made-up capitals (filtered to single tokens per tokenizer).
CITIES: tuple[str, ...] = (
    "Lyon", "Milan", "Munich", "Osaka", "Sydney", "Toronto", "Chicago", "Boston", "Dallas", "Denver",
    "Seattle", "Houston", "Venice", "Naples", "Geneva", "Zurich", "Hamburg", "Porto", "Seville",
    "Valencia", "Florence", "Marseille", "Kyoto", "Shanghai", "Mumbai", "Dubai", "Toledo", "Miami",
    *(v for k, v in CAPITALS.items() if k != "Argentina"),
)
#: Made-up countries for the ``nomemory`` kind.
FAKE_COUNTRIES = (
    "Veldoria", "Quorland", "Zembria", "Taloria", "Mirvania", "Ostrelia", "Brakistan", "Florinia",
    "Gandoria", "Kelvania", "Norvania", "Pelomia", "Drovenia", "Sarkovia", "Luminar", "Vexland",
    "Torundi", "Calvaria", "Ezmeria", "Jorvath",
)


#: Countries whose capital's first token is not the whole name ("Buenos" Aires).
_MULTIWORD = frozenset({"Argentina"})


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
        """Build from a JSON record (see :func:`load_qa_jsonl` for the fields).

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


@dataclass(frozen=True)
class QAPrompt:
    """A rendered prompt and where its context sentences are, in tokens.

    Attributes:
        text: the full prompt string.
        ids: its token ids.
        sentence_spans: per context sentence, the token range ``[start, end)`` it covers.
        token_sentence: per token, the index of its context sentence, or -1 outside the context.
    """

    text: str
    ids: list[int]
    sentence_spans: list[tuple[int, int]]
    token_sentence: list[int]

    @property
    def context_range(self) -> tuple[int, int]:
        """Token range ``[start, end)`` from the first to the last context token."""
        if not self.sentence_spans:
            return (0, 0)
        return (self.sentence_spans[0][0], self.sentence_spans[-1][1])

    def token_mask(self, i: int, length: int | None = None) -> torch.Tensor:
        """Boolean mask ``[length or len(ids)]`` of the tokens of sentence ``i``."""
        n = length if length is not None else len(self.ids)
        m = torch.zeros(n, dtype=torch.bool)
        s, e = self.sentence_spans[i]
        m[s:e] = True
        return m


def _user_content(context: str | None, question: str) -> tuple[str, int]:
    """The user message and the character offset of the context inside it."""
    if context is None:
        return f"Question: {question}", -1
    head = "Context: "
    return f"{head}{context}\nQuestion: {question}", len(head)


def prompt_text(sentences: Sequence[str] | None, question: str, prefix: str, tokenizer: Any, fmt: Fmt = "chat") -> tuple[str, list[tuple[int, int]]]:
    """The prompt string and the character range of each context sentence in it.

    Args:
        sentences: the context sentences, or None for a closed-book prompt.
        question: the question.
        prefix: the answer lead-in appended after the assistant header (or ``Answer:``).
        tokenizer: used for its chat template when ``fmt="chat"``.
        fmt: ``chat`` (instructed chat template + prefilled answer) or ``plain``.

    Raises:
        TaskError: ``fmt="chat"`` with a tokenizer that has no chat template, or a template that
            does not contain the user message verbatim.
    """
    context = None if sentences is None else " ".join(sentences)
    user, ctx_off = _user_content(context, question)
    if fmt == "plain":
        pre = ""
        text = f"{user}\nAnswer:" + (f" {prefix}" if prefix else "")
    elif fmt == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise TaskError("fmt='chat' needs a tokenizer with a chat template; use fmt='plain'")
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        full = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if full.count(user) != 1:
            raise TaskError("the chat template does not contain the user message exactly once; use fmt='plain'")
        pre = full[: full.index(user)]
        text = full + prefix
    else:
        raise TaskError(f"unknown prompt format {fmt!r}; use 'chat' or 'plain'")
    spans: list[tuple[int, int]] = []
    if sentences is not None:
        at = len(pre) + ctx_off
        for s in sentences:
            spans.append((at, at + len(s)))
            at += len(s) + 1
    return text, spans


def render(item: QAItem, tokenizer: Any, fmt: Fmt = "chat", sentences: Sequence[str] | Literal["item"] | None = "item") -> QAPrompt:
    """Tokenize an item's prompt and map tokens to context sentences.

    Args:
        item: the QA item.
        tokenizer: a *fast* Hugging Face tokenizer (offsets are needed).
        fmt: prompt format (see :func:`prompt_text`).
        sentences: override the context sentences (``None`` = closed book).

    Raises:
        TaskError: the tokenizer gives no offset mapping, or a sentence gets no token.
    """
    sents = item.sentences if isinstance(sentences, str) else sentences
    text, char_spans = prompt_text(sents, item.question, item.prefix, tokenizer, fmt)
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
    except NotImplementedError:
        raise TaskError("sentence attribution needs a fast tokenizer (offset mapping)") from None
    ids = list(enc.input_ids)
    offsets = enc["offset_mapping"]
    tok_sent = [-1] * len(ids)
    for t, (a, b) in enumerate(offsets):
        best, best_ov = -1, 0
        for si, (s, e) in enumerate(char_spans):
            ov = min(b, e) - max(a, s)
            if ov > best_ov:
                best, best_ov = si, ov
        tok_sent[t] = best
    spans: list[tuple[int, int]] = []
    for si in range(len(char_spans)):
        toks = [t for t, x in enumerate(tok_sent) if x == si]
        if not toks:
            raise TaskError(f"context sentence {si} ({(sents or [''])[si]!r}) maps to no token")
        if toks != list(range(toks[0], toks[-1] + 1)):
            raise TaskError(f"context sentence {si} maps to non-contiguous tokens {toks}")
        spans.append((toks[0], toks[-1] + 1))
    return QAPrompt(text, ids, spans, tok_sent)


# -- generators -------------------------------------------------------------------------------------


def _single_token(tok: Any, word: str) -> bool:
    return tok is None or len(tok(" " + word, add_special_tokens=False).input_ids) == 1


def _capital_sentence(country: str, city: str) -> str:
    return f"The capital of {country} is {city}."


def make_qa_items(kind: str, n: int = 16, seed: int = 0, tokenizer: Any = None, n_sentences: tuple[int, int] = (3, 5)) -> list[QAItem]:
    """Generate up to ``n`` unfiltered items of one kind (no model needed).

    Args:
        kind: ``agree``, ``conflict`` or ``nomemory``.
        n: number of items (subjects are reused with fresh distractors if ``n`` exceeds them).
        seed: RNG seed.
        tokenizer: if given, only cities that are one token (with a leading space) are used.
        n_sentences: inclusive range of the number of context sentences.

    Raises:
        TaskError: unknown kind.
    """
    if kind not in KINDS:
        raise TaskError(f"unknown QA kind {kind!r}; kinds are {', '.join(KINDS)}")
    rng = random.Random(f"{kind}-{seed}")
    countries = [c for c in CAPITALS if c not in _MULTIWORD and _single_token(tokenizer, CAPITALS[c])]
    cities = sorted({c for c in CITIES if _single_token(tokenizer, c)})
    subjects = list(FAKE_COUNTRIES) if kind == "nomemory" else list(countries)
    items: list[QAItem] = []
    rounds = 0
    while len(items) < n and rounds < 50:
        rng.shuffle(subjects)
        for s in subjects:
            if len(items) >= n:
                break
            true = CAPITALS.get(s)
            if kind == "agree":
                ans = true
            else:
                ans = rng.choice([c for c in cities if c != true and c not in CAPITALS.values()] if kind == "conflict" else cities)
            assert ans is not None
            k = rng.randint(*n_sentences)
            others = rng.sample([c for c in countries if c != s and CAPITALS[c] != ans], k - 1)
            sents = [_capital_sentence(o, CAPITALS[o]) for o in others]
            gold = rng.randrange(k)
            sents.insert(gold, _capital_sentence(s, ans))
            items.append(QAItem(
                tuple(sents), f"What is the capital of {s}?", f"The capital of {s} is", " " + ans, gold, kind,
                None if true is None else " " + true, s, {"round": rounds},
            ))
        rounds += 1
    return items


def next_token(model: Any, prompts: Sequence[Sequence[int]]) -> list[int]:
    """Greedy next token of each prompt (equal-length prompts share one batched forward)."""
    out = [0] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_len.setdefault(len(ids), []).append(i)
    with torch.no_grad():
        for idx in by_len.values():
            t = torch.tensor([list(prompts[i]) for i in idx], device=model.device)
            top = model.runner.forward(t, last_only=True).logits[:, -1].argmax(-1).tolist()  # type: ignore[union-attr]
            for i, v in zip(idx, top, strict=True):
                out[i] = int(v)
    return out


@dataclass
class QADataset:
    """Items of the three kinds, filtered against the model, with the counts kept.

    Attributes:
        items: all kept items.
        counts: per kind, ``{"generated": g, "kept": k}`` and the filter used.
        fmt: the prompt format the filter used.
    """

    items: list[QAItem]
    counts: dict[str, dict[str, Any]]
    fmt: str = "chat"

    def of_kind(self, kind: str) -> list[QAItem]:
        return [it for it in self.items if it.kind == kind]


def qa_dataset(
    n_per_kind: int = 20, seed: int = 0, model: Any = None, fmt: Fmt = "chat", kinds: Sequence[str] = KINDS,
    n_sentences: tuple[int, int] = (3, 5),
) -> QADataset:
    """The three kinds, filtered so that the memory side is what the kind claims.

    With a model, the closed-book answer (same prompt, no context) is checked: ``agree`` and
    ``conflict`` keep subjects the model knows (closed-book top-1 = the true capital), so in a
    conflict the memory answer differs from the context answer; ``nomemory`` keeps items whose
    closed-book top-1 is *not* the context answer. Counts kept per kind go into ``counts``.
    ``n_sentences`` is the inclusive range of context sentences (see :func:`make_qa_items`).
    """
    tok: Any = getattr(model, "tokenizer", None)
    items: list[QAItem] = []
    counts: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        cand = make_qa_items(kind, n_per_kind * 2 if model is not None else n_per_kind, seed, tok, n_sentences)
        kept = cand
        if model is not None:
            subjects = sorted({it.subject for it in cand})
            first = {it.subject: it for it in reversed(cand)}
            top = next_token(model, [render(first[s], tok, fmt, sentences=None).ids for s in subjects])
            by_subject = dict(zip(subjects, top, strict=True))
            closed = [by_subject[it.subject] for it in cand]
            ans = [tok(it.answer, add_special_tokens=False).input_ids[0] for it in cand]
            if kind == "nomemory":
                kept = [it for it, c, a in zip(cand, closed, ans, strict=True) if c != a]
            else:
                mem = [tok(it.memory, add_special_tokens=False).input_ids[0] for it in cand]
                kept = [it for it, c, m in zip(cand, closed, mem, strict=True) if c == m]
        kept = kept[:n_per_kind]
        counts[kind] = {"generated": len(cand), "kept": len(kept),
                        "filter": "closed-book top-1 != context answer" if kind == "nomemory" else "closed-book top-1 == true capital"}
        items.extend(kept)
    return QADataset(items, counts, fmt)


def load_qa_jsonl(path: str | Path) -> list[QAItem]:
    """Read QA items from JSONL, one object per line.

    Fields: ``sentences`` (list of strings), ``question``, ``answer`` (the next-token text, e.g.
    ``" Lyon"``), ``gold`` (index of the source sentence); optional ``prefix`` (answer lead-in),
    ``kind``, ``memory`` (closed-book answer), ``subject``; other fields go to ``meta``.

    Raises:
        TaskError: missing file, bad JSON, or a bad record (names the line).
    """
    p = Path(path)
    if not p.is_file():
        raise TaskError(f"QA file {p} does not exist")
    out = []
    for where, rec in iter_jsonl(p):
        out.append(QAItem.from_json(rec, where))
    if not out:
        raise TaskError(f"QA file {p} has no records")
    return out


def save_qa_jsonl(items: Sequence[QAItem], path: str | Path) -> Path:
    """Write items as JSONL (readable by :func:`load_qa_jsonl`)."""
    p = Path(path)
    p.write_text("".join(json.dumps(it.to_json()) + "\n" for it in items))
    return p


# -- the patching task -------------------------------------------------------------------------------


def same_length_distractor(item: QAItem, tokenizer: Any, fmt: Fmt = "chat") -> QAItem | None:
    """``item`` with its gold sentence replaced by a true-capital distractor of the same token length.

    The replacement is about a country not in the context and not the subject, so the question is
    no longer answerable from the context. Returns None when no candidate has the right length.
    """
    target = len(render(item, tokenizer, fmt).ids)
    used = set(item.context.split())
    for c in sorted(CAPITALS, key=lambda x: (len(x), x)):
        if c == item.subject or c in used or CAPITALS[c] in used:
            continue
        cand = item.replace_sentence(item.gold, _capital_sentence(c, CAPITALS[c]))
        if len(render(cand, tokenizer, fmt).ids) == target:
            return cand
    return None


def qa_patching_task(
    n: int = 16, seed: int = 0, model: Any = None, fmt: Fmt = "chat", variant: str = "context",
    n_sentences: tuple[int, int] = (3, 5), equal_length: bool = True,
) -> Task:
    """Conflict items as a patching task: context-answering run vs memory-answering run.

    ``variant="context"``: clean = counterfactual context (answer " Lyon"), corrupt = answer
    sentence swapped for a same-length distractor (the model answers " Paris"), answer = context
    answer, wrong = memory answer. Denoising then scores components for *context use*.
    ``variant="memory"``: the roles swapped (clean = the memory run, answer = memory answer), so
    denoising scores components for *memory use*.

    With a model, examples are kept when the clean run prefers its answer over the wrong one and
    the corrupt run the reverse (logit difference > 0 and < 0); ``params`` records the counts.

    ``equal_length=True`` takes the ``n`` examples from the most populated prompt lengths first:
    the patching engine batches equal-length examples (``TokenizedTask.groups()``), so a task of
    one or two lengths sweeps in one or two batches instead of one per example.

    Raises:
        TaskError: no model/tokenizer (token lengths must be aligned), or an unknown variant.
    """
    tok: Any = getattr(model, "tokenizer", None)
    if tok is None:
        raise TaskError("qa_patching_task needs a model with a tokenizer to align token lengths")
    if variant not in ("context", "memory"):
        raise TaskError(f"unknown variant {variant!r}; use 'context' or 'memory'")
    items = qa_dataset(n * 3, seed, model, fmt, kinds=("conflict",), n_sentences=n_sentences).items
    exs: list[Example] = []
    for it in items:
        alt = same_length_distractor(it, tok, fmt)
        if alt is None or it.memory is None:
            continue
        ctx_p, mem_p = render(it, tok, fmt).text, render(alt, tok, fmt).text
        meta = {"subject": it.subject, "gold": it.gold, "sentences": list(it.sentences), "distractor": alt.sentences[it.gold]}
        if variant == "context":
            exs.append(Example(ctx_p, mem_p, it.answer, it.memory, meta))
        else:
            exs.append(Example(mem_p, ctx_p, it.memory, it.answer, meta))
    cand = len(exs)
    if model is not None and exs:
        kept = []
        for ex in exs:
            a = tok(ex.answer, add_special_tokens=False).input_ids[0]
            w = tok(ex.wrong, add_special_tokens=False).input_ids[0]
            ids = torch.tensor([tok(ex.clean).input_ids, tok(ex.corrupt).input_ids], device=model.device)
            with torch.no_grad():
                lg = model.runner.forward(ids, last_only=True).logits[:, -1]
            ld = (lg[:, a] - lg[:, w]).tolist()
            if ld[0] > 0 and ld[1] < 0:
                kept.append(ex)
        exs = kept
    if equal_length:
        by_len: dict[int, list[Example]] = {}
        for ex in exs:
            by_len.setdefault(len(tok(ex.clean).input_ids), []).append(ex)
        exs = [ex for _, grp in sorted(by_len.items(), key=lambda kv: (-len(kv[1]), kv[0])) for ex in grp]
    exs = exs[:n]
    params = {"n": n, "seed": seed, "fmt": fmt, "variant": variant, "candidates": cand, "kept": len(exs),
              "n_sentences": list(n_sentences), "equal_length": equal_length}
    return Task(f"extractive_qa_{variant}", exs, params,
                "extractive QA conflict: counterfactual context vs the same prompt with the answer sentence swapped out")
