"""Circuits: edges of the residual graph, exact path patching, EAP / EAP-IG, discovery, faithfulness.

Node-level localisation says *which* components matter; a circuit says *how they talk*. The pieces:

* :mod:`~patchtrace.circuits.graph` — senders, receivers and the edges between them (pre-norm
  families; GQA keys/values per KV head);
* :mod:`~patchtrace.circuits.forward` — a forward in which each receiver has its own input;
* :mod:`~patchtrace.circuits.exact` — exact effects of single edges (the edge grid) and edge sets;
* :mod:`~patchtrace.circuits.eap` — EAP and EAP-IG (inputs and activations) on the same grid;
* :mod:`~patchtrace.circuits.discovery` — top-n, greedy, dead-node pruning, ACDC;
* :mod:`~patchtrace.circuits.faithfulness` — faithfulness curves under both conventions;
* :mod:`~patchtrace.circuits.circuit` — the :class:`Circuit` result (save/load, graph picture).

Nothing is imported here at package import time beyond the submodules' names (import them directly).
"""
