"""Shared set-up for the recipe tests: one CPU thread, `recipes/sft.py` importable."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import load_script

# Tiny models gain nothing from intra-op threads, and on a shared CPU the threads' spin-waits make each
# step up to 10x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sft():
    """The `recipes/sft.py` module (a script, not a package)."""
    return load_script("recipes/sft.py", "recipes_sft")
