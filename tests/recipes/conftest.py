"""Shared set-up for the recipe tests: offline, repo on the path, one CPU thread, `recipes/sft.py` importable."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a shared CPU the threads' spin-waits make each
# step up to 10x slower.
torch.set_num_threads(1)



@pytest.fixture(scope="session")
def sft():
    """The `recipes/sft.py` module (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("recipes_sft", REPO_ROOT / "recipes" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
