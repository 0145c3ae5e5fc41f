"""Shared fixtures of the eval_harness tests: offline settings, fixture paths, real data, tiny checkpoints.

Everything runs offline (no hub), on one CPU thread (the tiny models are faster that way and the machine's
cores are shared), with NLTK's offline sentence-model fallback written into a temporary folder. Real public
data comes from the root conftest's `shared_data_dir` (tests using it are skipped without it).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["TRANSFORMERS_OFFLINE"] = "1"
if "datasets" not in sys.modules and "HF_DATASETS_CACHE" not in os.environ:
    # The local fixture files (many in fresh temporary folders) would each leave a cache entry under ~/.cache.
    _DATASETS_CACHE = tempfile.mkdtemp(prefix="milora-eval-datasets-")
    os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE
    atexit.register(shutil.rmtree, _DATASETS_CACHE, True)

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def _offline_cpu_setup(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ["MILORA_NLTK_DATA"] = str(tmp_path_factory.mktemp("nltk_data"))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def gsm8k_test_file(shared_data_dir) -> Path:
    return shared_data_dir / "gsm8k_test.jsonl"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A merged-checkpoint directory: the tiny llama and its byte tokenizer, saved with save_pretrained."""
    from milora.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A LLaVA merged-checkpoint directory: tiny LLaVA weights and its processor."""
    from milora.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint("llava", tmp_path_factory.mktemp("tiny_llava"))
