"""The sweep engine's own guarantees: chunking, memory planning, the no-op skip, checkpoint/resume.

Exactness of every site kind against the independent HF-hook reference lives in test_exactness.py;
here the references are the engine's plain path (full forward per patch) and an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny
from patchtrace import PatchingConfig, Scores, SiteSpec, activation_patching, make_task
from patchtrace.engine.checkpoint import Checkpoint, CheckpointError
from patchtrace.engine.sweep import EngineError, Patch, plan_sweep, resolve
from patchtrace.methods.activation_patching import build_grid


@pytest.fixture(scope="module")
def llama(smol_tokenizer):
    return make_tiny("llama", tokenizer=smol_tokenizer)


@pytest.fixture(scope="module")
def ioi_tok(llama):
    return make_task("ioi", n=3, seed=2).tokenize(llama.tokenizer)


def test_small_memory_budget_chunks_without_changing_results(llama, ioi_tok):
    spec = SiteSpec("neuron", per_unit=True, positions=[-1, -3], layers=(0, 2))
    big = activation_patching(llama, ioi_tok, spec, PatchingConfig(sanity_check=False))
    small = activation_patching(llama, ioi_tok, spec, PatchingConfig(sanity_check=False, max_memory=300_000))
    assert big.values.abs().max() > 1e-4  # non-vacuous
    torch.testing.assert_close(small.per_example, big.per_example, atol=1e-5, rtol=0)


def test_budget_too_small_for_one_patch_is_refused_before_compute(llama, ioi_tok):
    with pytest.raises(EngineError, match="memory budget"):
        activation_patching(llama, ioi_tok, SiteSpec("head", True, "all"), PatchingConfig(max_memory=1000))


def test_plan_counts_forward_equivalents(llama, ioi_tok):
    T = ioi_tok.uniform_length()
    L = llama.dims.n_layers
    grid = build_grid(llama, SiteSpec("resid_pre", positions="all"), ioi_tok)
    patches = [Patch((resolve(s, llama, T),)) for s in grid.sites()]
    plan = plan_sweep(llama, patches, len(ioi_tok), T)
    # independent count: resid_pre[l]@p recomputes layers l..L-1 at positions p..T-1
    expect = sum((L - layer) / L * (T - p) / T for layer in range(L) for p in range(T))
    assert plan.forward_equivalents == pytest.approx(expect)
    plain = plan_sweep(llama, patches, len(ioi_tok), T, fast=False)
    assert plain.forward_equivalents == len(patches) > plan.forward_equivalents


def test_noop_skip_positions_before_first_difference(llama, ioi_tok):
    """Patches where clean == corrupt (positions before the first differing token) give exactly the
    base metric; the plain path, which runs them, agrees to float tolerance."""
    spec = SiteSpec("head", per_unit=True, positions="all", layers=(1,))
    fast = activation_patching(llama, ioi_tok, spec, PatchingConfig(sanity_check=False))
    plain = activation_patching(llama, ioi_tok, spec, PatchingConfig(sanity_check=False, fast=False))
    first_diff = min(
        next(i for i, (a, b) in enumerate(zip(c, k, strict=True)) if a != b)
        for c, k in zip(ioi_tok.clean, ioi_tok.corrupt, strict=True)
    )
    assert first_diff > 2
    assert torch.count_nonzero(fast.per_example[..., :first_diff]) == 0  # skipped: exactly the base
    assert fast.per_example[..., first_diff:].abs().max() > 1e-4  # non-vacuous
    torch.testing.assert_close(fast.per_example, plain.per_example, atol=1e-5, rtol=0)


def test_sanity_check_really_computes(llama, ioi_tok, monkeypatch):
    """Clean-into-clean patches are all no-ops, which the engine would skip: the built-in sanity
    check must force them through the forward, or it could never fail."""
    calls = []
    orig = llama.runner.forward

    def counting(*a, **k):
        calls.append(k.get("start_layer", 0))
        return orig(*a, **k)

    spec = SiteSpec("head", per_unit=True, positions="last", layers=(1,))
    monkeypatch.setattr(llama.runner, "forward", counting)
    activation_patching(llama, ioi_tok, spec, PatchingConfig(sanity_check=False))
    without = len(calls)
    calls.clear()
    sc = activation_patching(llama, ioi_tok, spec, PatchingConfig(sanity_check=True))
    assert len(calls) > without  # the sanity patches ran through the model
    assert sc.provenance["sanity_max_abs"] < 1e-5


def test_checkpoint_refuses_a_different_run(tmp_path):
    Checkpoint(tmp_path, "a")
    with pytest.raises(CheckpointError, match="different run"):
        Checkpoint(tmp_path, "b")


_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import make_tiny
    from transformers import AutoTokenizer
    from patchtrace import PatchingConfig, SiteSpec, activation_patching, make_task
    tok = AutoTokenizer.from_pretrained({tokdir!r})
    model = make_tiny("gpt2", tokenizer=tok)
    task = make_task("ioi", n=2, seed=3)
    slow = {slow}
    if slow:  # make each block take a while so the parent can kill the run part-way
        import time
        from patchtrace.engine import sweep
        orig = sweep._run_chunk_fast
        def slowed(*a, **k):
            time.sleep(0.4)
            return orig(*a, **k)
        sweep._run_chunk_fast = slowed
    cfg = PatchingConfig(block_rows=32, sanity_check=False)
    activation_patching(model, task, SiteSpec("neuron", per_unit=True, positions="last"), cfg, out_dir={out!r})
    """
)


def _script(tmp_path: Path, out: Path, tokdir: str, slow: bool) -> Path:
    tests = str(Path(__file__).resolve().parents[1])
    p = tmp_path / f"run_{slow}.py"
    p.write_text(_SCRIPT.format(tests=tests, tokdir=tokdir, out=str(out), slow=slow))
    return p


def test_killed_sweep_resumes_to_the_uninterrupted_result(tmp_path, smol_tokenizer):
    """Kill a checkpointing sweep with SIGKILL part-way, rerun the same command, compare with a run
    that was never interrupted."""
    tokdir = tmp_path / "tok"
    smol_tokenizer.save_pretrained(tokdir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, str(_script(tmp_path, out, str(tokdir), True))], env=env)
    partial = out / ".partial"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(partial.glob("block-*.safetensors"))) < 2:
        if proc.poll() is not None:
            pytest.fail("the sweep finished before it could be interrupted")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(partial.glob("block-*.safetensors")))
    assert done_before >= 2 and not (out / "scores.json").exists()
    subprocess.run([sys.executable, str(_script(tmp_path, out, str(tokdir), False))], env=env, check=True)
    ref_dir = tmp_path / "reference"
    subprocess.run([sys.executable, str(_script(tmp_path, ref_dir, str(tokdir), False))], env=env, check=True)
    resumed, ref = Scores.load(out), Scores.load(ref_dir)
    assert not partial.exists()  # cleared after the final save
    assert ref.values.abs().max() > 1e-5
    assert torch.equal(resumed.per_example, ref.per_example)
    assert torch.equal(resumed.values, ref.values)
