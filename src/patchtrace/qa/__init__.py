"""Extractive QA: does the model answer from the context or from memory, and from which sentence?

Everything specific to context-augmented question answering lives in this package, one job per
module:

* data — :mod:`~patchtrace.qa.items` (:class:`~patchtrace.qa.items.QAItem`, the data model),
  :mod:`~patchtrace.qa.prompts` (chat/plain prompts and the token span of every context sentence),
  :mod:`~patchtrace.qa.generators` (agree / conflict / nomemory capital-city items),
  :mod:`~patchtrace.qa.dataset` (items filtered by what the model knows closed-book),
  :mod:`~patchtrace.qa.io` (JSONL);
* localization — :mod:`~patchtrace.qa.patching` (the context-vs-memory patching task, registered as
  ``extractive_qa``) and :mod:`~patchtrace.qa.circuit` (context-use and memory-use effects);
* use — :mod:`~patchtrace.qa.generation` (greedy generation with a KV cache, recording chosen heads'
  attention), :mod:`~patchtrace.qa.attnattrib` (ATTNATTRIB sentence attribution and the
  head-selection rule), :mod:`~patchtrace.qa.baselines` (leave-one-out, gradient × input,
  mean/random-head attention), :mod:`~patchtrace.qa.steering` (attribution-guided, gated attention
  steering) and :mod:`~patchtrace.qa.html` (the self-contained HTML view).

Submodules are imported on use; importing this package loads nothing.

Example:
    >>> from patchtrace.qa.generators import make_qa_items
    >>> make_qa_items("nomemory", n=1, seed=0)[0].memory is None
    True
"""
