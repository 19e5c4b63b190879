"""Tiny diffusion pipelines, one per module (built from configs in a fraction of a second)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def sd():
    from patchtrace.diffusion.tiny import tiny_sd

    p = tiny_sd()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def sdxl():
    from patchtrace.diffusion.tiny import tiny_sdxl

    p = tiny_sdxl()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def small_random():
    from patchtrace.diffusion.small.pipeline import random_small

    return random_small()
