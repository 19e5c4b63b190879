"""Using a localization: attribution and steering in the model's own forward pass.

* :mod:`patchtrace.apply.generation` — greedy generation on the runner with a KV cache, recording
  chosen heads' attention at every step;
* :mod:`patchtrace.apply.attnattrib` — ATTNATTRIB sentence attribution and the head-selection rule;
* :mod:`patchtrace.apply.baselines` — leave-one-out, gradient × input, mean/random-head attention;
* :mod:`patchtrace.apply.steering` — attribution-guided attention steering toward the context,
  gated so that answers already copied from the context are left alone.

Submodules are imported on use; importing this package loads nothing.
"""
