"""Sweep jobs: the engine's plan → blocks → run → merge, checkpoint/resume and executors.

A toy job checks the machinery itself (resumed blocks are not recomputed, progress reaches its
total, merge sees blocks in plan order whatever order an executor finishes them in). Then every
sweep-type method that checkpoints — causal tracing and DBM's exact-patching ranking (activation
patching: tests/engine/test_checkpoint.py) — is interrupted after some blocks and resumed, and must
equal the uninterrupted result bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from patchtrace.engine.checkpoint import Checkpoint
from patchtrace.engine.job import Block, LocalExecutor, execute


class Toy:
    """Block i returns [i, i²]; merge stacks them. Counts which blocks ran."""

    key = "toy-1"

    def __init__(self, n: int = 5) -> None:
        self.ran: list[int] = []
        self.n = n

    def blocks(self):
        return [Block(i, 2, f"b{i}") for i in range(self.n)]

    def run_block(self, block, on_progress=None):
        self.ran.append(block.index)
        if on_progress:
            on_progress(1)  # reports half; the executor completes the share
        return {"v": torch.tensor([block.index, block.index**2], dtype=torch.float32)}

    def merge(self, results):
        return torch.stack([r["v"] for r in results])


class Reversed(LocalExecutor):
    """Runs blocks in reverse order (as a distributed executor might finish them)."""

    def map(self, job, blocks, on_progress):
        return super().map(job, list(reversed(blocks)), on_progress)


def test_merge_order_and_progress_do_not_depend_on_the_executor():
    seen: list[tuple[int, int]] = []
    a = execute(Toy(), on_progress=lambda d, t: seen.append((d, t)))
    b = execute(Toy(), executor=Reversed())
    want = torch.tensor([[i, i * i] for i in range(5)], dtype=torch.float32)
    assert torch.equal(a, want) and torch.equal(b, want)
    assert seen[-1] == (10, 10) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_resume_runs_only_missing_blocks(tmp_path):
    out = tmp_path / "o"
    with Checkpoint(out, Toy.key) as ck:  # an earlier run that finished blocks 0 and 3
        ck.save(0, {"v": torch.tensor([0.0, 0.0])})
        ck.save(3, {"v": torch.tensor([3.0, 9.0])})
    job = Toy()
    res = execute(job, out_dir=out, save=lambda r, p: None)
    assert sorted(job.ran) == [1, 2, 4]
    assert torch.equal(res, torch.tensor([[i, i * i] for i in range(5)], dtype=torch.float32))
    assert not (out / ".partial").exists()


def _interrupt_after(monkeypatch, n_blocks: int) -> None:
    real = Checkpoint.save
    count = {"n": 0}

    def save(self, block, tensors):
        real(self, block, tensors)
        count["n"] += 1
        if count["n"] == n_blocks:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save)


def test_causal_tracing_resumes_to_the_uninterrupted_result(smol_tokenizer, tmp_path, monkeypatch):
    from conftest import make_tiny
    from patchtrace.methods import causal_tracing as ct
    from patchtrace.tasks.base import Example, Task

    model = make_tiny("llama", seed=2, tokenizer=smol_tokenizer)
    exs = [Example(f"The capital of {c} is", f"The capital of {o} is", f" {a}", f" {w}", {"subject": c})
           for c, o, a, w in (("France", "Italy", "Paris", "Rome"), ("Italy", "France", "Rome", "Paris"))]
    tok = Task("capitals", exs).tokenize(model.tokenizer)
    assert tok.uniform_length() is not None
    cfg = ct.TracingConfig(samples=2, metric="logprob")
    monkeypatch.setattr(ct, "ROWS_PER_BLOCK", 2 * len(tok) * 4)  # 4 cells per block: several blocks
    truth = ct.run(model, tok, None, cfg)
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 2)
        with pytest.raises(KeyboardInterrupt):
            ct.run(model, tok, None, cfg, out_dir=tmp_path / "o")
    assert len(list((tmp_path / "o" / ".partial").glob("block-*"))) == 2
    again = ct.run(model, tok, None, cfg, out_dir=tmp_path / "o")
    assert torch.equal(again.values, truth.values) and torch.equal(again.per_example, truth.per_example)


def test_dbm_ranking_resumes_to_the_uninterrupted_result(smol_tokenizer, tmp_path, monkeypatch):
    from conftest import make_tiny
    from patchtrace.desiderata import Desideratum, Triple, tokenize_desiderata
    from patchtrace.methods.dbm.evaluate import exact_patching_ranking
    from patchtrace.sites import SiteSpec

    model = make_tiny("llama", seed=6, tokenizer=smol_tokenizer)
    trip = [Triple("Mary and John went out. John thanked", "Mary and Paul went out. Paul thanked", " Mary"),
            Triple("Anna and Tom met. Tom waved to", "Anna and Bob met. Bob waved to", " Anna"),
            Triple("Then Mary and John went to the shop and John gave it to",
                   "Then Mary and Paul went to the shop and Paul gave it to", " Mary")]
    tds = tokenize_desiderata([Desideratum("v", trip)], model.tokenizer)
    assert len(tds[0].groups()) > 1  # several lengths → several blocks
    specs = [SiteSpec("head", per_unit=True, layers=(0, 2))]
    truth = exact_patching_ranking(model, tds, specs)
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 1)
        with pytest.raises(KeyboardInterrupt):
            exact_patching_ranking(model, tds, specs, out_dir=tmp_path / "r")
    again = exact_patching_ranking(model, tds, specs, out_dir=tmp_path / "r")
    assert again == truth
    assert not (tmp_path / "r").exists()  # its checkpoint folder is gone once the ranking is done
    assert len({round(v, 6) for _, v in truth}) > 1  # non-vacuous: the components differ
