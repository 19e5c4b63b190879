"""Time one sweep of whatever patchtrace is on the path: for old-vs-new comparisons of the library.

Run it twice, interleaved, once per source tree, on the same machine and thread count::

    git worktree add /tmp/old a61764a
    PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/ab_time.py heads   # the old code
    .venv/bin/python benchmarks/ab_time.py heads                           # this checkout

``heads``: exact patching of all 270 SmolLM2 heads at the last position (IOI n=16, seed 0).
``trace``: ROME causal tracing (resid_post, 4 noise samples) of the equal-length factual prompts of
``make_task("factual", n=4)``. One torch thread; one warm-up run, then the minimum of three. The
printed value is a checksum of the result, so both trees must agree on it. Only public API that both
versions share is used (positional config arguments are avoided; ``sites`` is passed only where the
run signature has it).
"""

from __future__ import annotations

import inspect
import sys
import time

import torch


def main() -> None:
    torch.set_num_threads(1)
    from patchtrace import SiteSpec, load_model, make_task
    from patchtrace.methods import activation_patching as ap
    from patchtrace.methods import causal_tracing as ct

    what = sys.argv[1] if len(sys.argv) > 1 else "heads"
    m = load_model()
    if what == "heads":
        tok = make_task("ioi", n=16, seed=0).tokenize(m.tokenizer)
        spec = SiteSpec("head", per_unit=True, positions="last")
        cfg = ap.PatchingConfig(sanity_check=False)

        def go():  # type: ignore[no-untyped-def]
            return ap.run(m, tok, spec, cfg)
    else:
        t = make_task("factual", n=4, seed=0)
        lens = t.tokenize(m.tokenizer, first_token=True).lengths
        tok = t.subset([i for i, n in enumerate(lens) if n == lens[0]]).tokenize(m.tokenizer, first_token=True)
        cfg = ct.TracingConfig(samples=4)
        takes_sites = "sites" in inspect.signature(ct.run).parameters

        def go():  # type: ignore[no-untyped-def]
            return ct.run(m, tok, None, cfg) if takes_sites else ct.run(m, tok, cfg)

    go()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        s = go()
        times.append(time.perf_counter() - t0)
    print(f"{what}: min {min(times):.2f} s of {', '.join(f'{x:.2f}' for x in times)}; checksum {float(s.values.sum()):.6f}")


if __name__ == "__main__":
    main()
