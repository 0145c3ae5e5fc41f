"""Settings every test shares: an offline Hugging Face stack and the path of the optional shared data.

The environment is set here, at import time, because pytest imports this file before any test module or
nested conftest, so transformers / datasets / huggingface_hub read these values when they are first imported.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(OFFLINE_ENVIRONMENT)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository checkout the tests run from."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The public benchmark data kept beside the checkout (`../shared/data`); the test is skipped without it."""
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"shared data directory {SHARED_DATA_DIR} not present")
    return SHARED_DATA_DIR
