"""Fixtures for the core tests: tiny models built from configs, seeded, on CPU."""

import pytest
import torch

from milora.tiny import tiny_model, tiny_tokenizer

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture
def llama():
    return tiny_model("llama").eval()


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def input_ids():
    return torch.randint(5, 250, (2, 16), generator=torch.Generator().manual_seed(0))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())
