"""The Ray executor against the local one: bit-identical results, a killed worker, a killed driver,
bad clusters — and no Ray process left behind.

One private local Ray instance serves the whole module (starting Ray takes seconds on 2 cores): it
is a :class:`RayExecutor` without an address, with 4 logical CPUs so that its own two workers and a
second driver's two fit at once. Its teardown shuts it down and checks that every process it
started (GCS, raylet, workers) is gone. The model is a tiny random Llama saved to a folder, so each
worker loads it itself, as it would load a real model from its cache.
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

pytest.importorskip("ray", reason="the Ray executor needs the 'ray' extra")

from patchtrace import SiteSpec, make_task
from patchtrace.engine.executors.ray_executor import RayExecutor, RayExecutorError
from patchtrace.methods import activation_patching as ap
from patchtrace.methods import causal_tracing as ct
from patchtrace.models.load import load_model

SITES = SiteSpec("head", per_unit=True, positions="last")  # 3 layers x 4 heads = 12 cells
CFG = ap.PatchingConfig(block_rows=4, sanity_check=False)  # 2 examples: 2 cells per block, 6 blocks


def _alive(pids: set[int]) -> set[int]:
    import psutil

    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_gone(pids: set[int], seconds: float = 15.0) -> set[int]:
    end = time.monotonic() + seconds
    while _alive(pids) and time.monotonic() < end:
        time.sleep(0.2)
    return _alive(pids)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A tiny random Llama saved as a transformers checkpoint (safetensors), with the SmolLM2 tokenizer."""
    from conftest import make_tiny

    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny("llama", tokenizer=smol_tokenizer).hf.save_pretrained(str(d))
    smol_tokenizer.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(str(model_dir))


@pytest.fixture(scope="module")
def task():
    return make_task("ioi", n=2, seed=0)


@pytest.fixture(scope="module")
def local(model, task):
    return ap.run(model, task, SITES, CFG)


@pytest.fixture(scope="module")
def ex():
    """The module's private Ray instance; on teardown: shut down, and nothing it started still runs."""
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    ex = RayExecutor(num_cpus=4, workers=2, threads=1)
    yield ex
    started = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert started, "the local Ray instance should run as child processes of this one"
    ex.close()
    left = _wait_gone(started)
    assert not left, f"Ray processes left running after shutdown: {[psutil.Process(p).cmdline()[:2] for p in left]}"


def _same(a, b) -> None:
    assert torch.equal(a.values, b.values)
    assert torch.equal(a.per_example, b.per_example)
    for k in a.extras:
        assert torch.equal(a.extras[k], b.extras[k]), k
    assert a.baselines == b.baselines


def test_ray_equals_local_bit_for_bit_with_one_progress_bar(ex, model, task, local):
    calls: list[tuple[int, int]] = []
    got = ap.run(model, task, SITES, CFG, executor=ex, on_progress=lambda d, t: calls.append((d, t)))
    _same(got, local)
    assert calls[-1] == (12, 12) and all(t == 12 for _, t in calls)
    assert len(set(ex.worker_pids)) == 2 and os.getpid() not in ex.worker_pids


def test_causal_tracing_on_ray_equals_local(ex, model, monkeypatch):
    from collections import Counter

    from patchtrace.tasks import Task

    one = lambda s: len(model.tokenizer(s, add_special_tokens=False).input_ids) == 1  # noqa: E731
    exs = [e for e in make_task("factual", n=30, seed=0).examples if one(e.answer) and one(e.wrong)]
    lens = [len(model.tokenizer(e.clean).input_ids) for e in exs]
    common = Counter(lens).most_common(1)[0][0]
    tok = Task("factual", [e for e, n in zip(exs, lens, strict=True) if n == common][:2]).tokenize(model.tokenizer)
    cfg = ct.TracingConfig(samples=2, metric="prob", target="top1")
    monkeypatch.setattr(ct, "ROWS_PER_BLOCK", 16)  # several blocks (the plan is made here, in the driver)
    _same(ct.run(model, tok, config=cfg, executor=ex), ct.run(model, tok, config=cfg))


def test_a_killed_worker_costs_only_its_block(ex, model, task, local):
    ex.start(model)  # workers up (already, when the tests above ran)
    pids = list(ex.worker_pids)
    victim: list[int] = []

    calls: list[int] = []

    def on_progress(done: int, total: int) -> None:
        calls.append(done)
        if not victim and done > 0:  # a worker is mid-sweep: kill its process
            victim.append(pids[0])
            os.kill(pids[0], signal.SIGKILL)

    retries = ex.retries
    got = ap.run(model, task, SITES, CFG, executor=ex, on_progress=on_progress)
    _same(got, local)
    assert victim and ex.retries == retries + 1, "exactly one block should have been re-run"
    assert victim[0] not in ex.worker_pids and not _wait_gone(set(victim), 5)
    assert len(ex.worker_pids) == 2  # the dead worker was replaced
    assert calls[-1] == 12 and max(calls) == 12, "the re-run block's progress is not counted twice"


DRIVER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from patchtrace import SiteSpec, make_task
    from patchtrace.engine.executors.ray_executor import RayExecutor
    from patchtrace.methods import activation_patching as ap
    from patchtrace.models.load import load_model

    model_dir, address, out = sys.argv[1:4]
    ex = RayExecutor(address, workers=1, threads=1)
    def on_progress(done, total):
        blocks = list(Path(out, ".partial").glob("block-*.safetensors"))
        if blocks and ex.worker_pids:
            print("WORKERS", *ex.worker_pids, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)   # the driver dies mid-sweep, one block saved
    cfg = ap.PatchingConfig(block_rows=4, sanity_check=False)
    ap.run(load_model(model_dir), make_task("ioi", n=2, seed=0), SiteSpec("head", per_unit=True, positions="last"),
           cfg, executor=ex, out_dir=out, on_progress=on_progress)
    print("FINISHED")
""")


def test_a_killed_driver_resumes_from_its_checkpoints(ex, model, model_dir, task, local, tmp_path):
    import ray

    out = tmp_path / "run"
    address = ray.get_runtime_context().gcs_address
    p = subprocess.run([sys.executable, "-c", DRIVER, str(model_dir), address, str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr[-2000:]
    saved = list((out / ".partial").glob("block-*.safetensors"))
    assert 1 <= len(saved) < 6, f"{len(saved)} blocks saved"
    # the dead driver's workers go with it
    workers = {int(x) for x in p.stdout.split("WORKERS", 1)[1].split()}
    assert not _wait_gone(workers), "workers of the killed driver still run"
    calls: list[tuple[int, int]] = []
    got = ap.run(model, task, SITES, CFG, executor=ex, out_dir=out, on_progress=lambda d, t: calls.append((d, t)))
    _same(got, local)
    assert calls[0][0] >= 2 * len(saved), "the resumed run starts from the saved blocks"
    assert not (out / ".partial").exists()


def test_unreachable_address_is_one_line_before_any_work():
    t0 = time.monotonic()
    with pytest.raises(RayExecutorError, match=r"Ray address '127\.0\.0\.1:1' is unreachable"):
        RayExecutor("127.0.0.1:1")
    with pytest.raises(RayExecutorError, match="use host:port"):
        RayExecutor("nowhere")
    assert time.monotonic() - t0 < 15


def test_a_model_built_in_memory_is_refused_by_name(ex, smol_tokenizer, task):
    from conftest import make_tiny

    m = make_tiny("llama", tokenizer=smol_tokenizer)
    with pytest.raises(RayExecutorError, match="model 'tiny-llama' was built in memory"):
        ap.run(m, task, SITES, CFG, executor=ex)


def test_workers_that_lack_the_model_fail_before_any_block(ex, model_dir, task, tmp_path):
    import shutil

    moved = tmp_path / "tiny-copy"
    shutil.copytree(model_dir, moved)
    m = load_model(str(moved))
    shutil.rmtree(moved)  # the driver has it in memory; the workers' disk does not
    with RayExecutor(workers=1, threads=1) as one:  # joins the module's instance (one worker: cheaper)
        with pytest.raises(RayExecutorError, match=r"the Ray worker on node \S+ cannot load model '.*tiny-copy'"):
            ap.run(m, task, SITES, CFG, executor=one, out_dir=tmp_path / "out")
        assert one.worker_pids == []  # the failed worker was stopped
    assert not list((tmp_path / "out").glob(".partial/block-*")), "no block may run"


def test_a_cuda_model_on_a_cluster_without_gpus_is_refused_before_any_worker(model_dir):
    m = load_model(str(model_dir))
    m.source = {**m.source, "device": "cuda"}  # as if loaded on a GPU (this cluster has none)
    with RayExecutor(workers=1, threads=1) as one:
        with pytest.raises(RayExecutorError, match="the model is on CUDA but the Ray cluster has no GPU"):
            one.start(m)
        assert one.worker_pids == []


def _procs_mentioning(text: str) -> dict[int, str]:
    """Live processes whose command line contains ``text`` (this test process excluded)."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if text in cmd and p.info["pid"] != os.getpid() and p.info["status"] != psutil.STATUS_ZOMBIE:
            out[p.info["pid"]] = cmd[:120]
    return out


def test_cli_error_after_starting_ray_leaves_no_ray_process(model_dir, tmp_path):
    """`patch --executor ray` starts its own local instance; a bad --layers fails after that (in the
    sweep plan): one line, exit 2, and every Ray process of that instance is gone."""
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="ptray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    cmd = [sys.executable, "-c", "from patchtrace.cli import main; main()", "patch", "--executor", "ray",
           "--model", str(model_dir), "--n", "2", "--layers", "7", "--out", str(tmp_path / "x"), "-q"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert p.returncode == 2, p.stdout + p.stderr[-3000:]
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]
    assert len(err) == 1 and "7" in err[0] and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert any(Path(ray_tmp).rglob("session_*")), "the command should have started its own Ray instance"
    end = time.monotonic() + 15
    while _procs_mentioning(ray_tmp) and time.monotonic() < end:
        time.sleep(0.3)
    assert not _procs_mentioning(ray_tmp), f"Ray processes left: {_procs_mentioning(ray_tmp)}"


def test_a_job_travels_without_its_model(model, task):
    """The pickled job holds placeholders for the model and its weights, and the worker's own model
    is plugged back in: the bytes are a tiny fraction of the weights, and a weight tensor the job
    refers to comes back as the receiving model's own tensor."""
    from patchtrace.engine.executors.shipping import dump_job, load_job
    from patchtrace.models.load import load_model as load_again

    job = ap.PatchingJob(model, task.tokenize(model.tokenizer), SITES, CFG)
    job.extra_weight = model.hf.get_parameter("model.embed_tokens.weight")  # a job may point at weights too
    data = dump_job(job, model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.hf.parameters())
    assert len(data) < weight_bytes / 100, f"{len(data)} bytes shipped for {weight_bytes} bytes of weights"
    other = load_again(model.source["spec"])  # what a worker loads itself
    got = load_job(data, other)
    assert got.model is other and got.extra_weight is other.hf.get_parameter("model.embed_tokens.weight")
    assert got.key == job.key and [b.index for b in got.blocks()] == [b.index for b in job.blocks()]
    assert torch.equal(got.run_block(got.blocks()[0])["patched"], job.run_block(job.blocks()[0])["patched"])


def test_cli_patch_on_ray_saves_the_local_result(ex, model_dir, tmp_path, monkeypatch):
    """`patch --executor ray` (joining the module's instance) saves exactly what `patch` saves."""
    from typer.testing import CliRunner

    from patchtrace.cli import build_app
    from patchtrace.results import Scores

    used = []
    real_map = RayExecutor.map
    monkeypatch.setattr(RayExecutor, "map", lambda self, *a: used.append(1) or real_map(self, *a))
    common = ["patch", "--model", str(model_dir), "--n", "2", "--sites", "head", "--positions", "last", "-q"]
    app = build_app()
    r_ray = CliRunner().invoke(app, [*common, "--executor", "ray", "--out", str(tmp_path / "ray")])
    assert r_ray.exit_code == 0, r_ray.output
    r_loc = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "local")])
    assert r_loc.exit_code == 0, r_loc.output
    assert used, "the Ray executor was not used"
    a, b = Scores.load(tmp_path / "ray"), Scores.load(tmp_path / "local")
    assert torch.equal(a.values, b.values) and torch.equal(a.per_example, b.per_example)
