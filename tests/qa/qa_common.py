"""Shared test data of the QA tests: one hand-written conflict item (the gold sentence is 1)."""

from __future__ import annotations

from patchtrace.qa.items import QAItem

ITEM = QAItem(
    ("The capital of Spain is Madrid.", "The capital of France is Lyon.", "The capital of Japan is Tokyo."),
    "What is the capital of France?", "The capital of France is", " Lyon", 1, "conflict", " Paris", "France",
)
