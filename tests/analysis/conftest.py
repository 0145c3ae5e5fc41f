"""Fixtures for the `milora.analysis` tests: tiny models on disk with updates whose analysis is known.

Everything is built offline from `milora.tiny`; the models are real transformers / PEFT objects saved with
`save_pretrained`. Session-scoped, so each checkpoint is built once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

RANK = 4
ADAPTED = ("q_proj", "v_proj")
TEXT = (
    "The quick brown fox jumps over the lazy dog.\n"
    "Singular values of a weight matrix describe how strongly it stretches each direction.\n"
    "\n"
    "Minor singular components carry little energy; principal ones carry most of it.\n"
) * 6


def subspace_update(weight: torch.Tensor, r: int, subset: str, magnitudes: torch.Tensor) -> torch.Tensor:
    """A rank-r update (float64) inside the span of W's top or bottom r singular vectors on both sides:
    dW = U_sub diag(magnitudes) V_sub^T."""
    U, _, Vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
    columns = slice(0, r) if subset == "top" else slice(U.shape[1] - r, U.shape[1])
    return U[:, columns] @ torch.diag(magnitudes.to(torch.float64)) @ Vh[columns, :]


def update_magnitudes(r: int) -> torch.Tensor:
    """Distinct magnitudes (so dW's singular vectors are unique up to sign), a few % of W's scale."""
    return torch.linspace(0.08, 0.04, r, dtype=torch.float64)


def adapted_weights(model) -> dict[str, torch.nn.Parameter]:
    return {
        name: module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ADAPTED
    }


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """Tiny matrices gain nothing from threads, and on a shared CPU intra-op threads spin-wait for each other
    (small SVDs ran 100x slower with 2 threads under load). Restored after each module, so other test
    packages keep their settings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def helpers():
    """The module-level helpers above, for tests that build their own updates."""
    return sys.modules[__name__]


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    from milora.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="session")
def minor_tuned_dir(tmp_path_factory) -> Path:
    """Merged checkpoint: base + a rank-4 update inside the bottom-4 singular subspace of every q_proj, v_proj."""
    from milora.tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama")
    with torch.no_grad():
        for weight in adapted_weights(model).values():
            weight.add_(subspace_update(weight, RANK, "bottom", update_magnitudes(RANK)).to(weight.dtype))
    path = tmp_path_factory.mktemp("minor_tuned")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="session")
def init_dirs(tmp_path_factory):
    """A `milora init` directory built by hand with PEFT (MiLoRA: minor r triplets, scaling 1), and an adapter
    "trained" from it (B, A moved by a known amount).

    Returns a dict: `init_dir` (residual base + milora_init/), `trained_adapter` (adapter dir), and float64
    tensors per adapted module name: `original` (W), `initial_delta` (B0 A0), `trained_delta` (B A).
    """
    from peft import LoraConfig, get_peft_model

    from milora.tiny import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("init")
    model = tiny_model("llama")
    original = {name: weight.detach().to(torch.float64).clone() for name, weight in adapted_weights(model).items()}
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(ADAPTED), init_lora_weights=True)
    peft_model = get_peft_model(model, config)
    initial_delta, trained_delta = {}, {}
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if name not in original:
                continue
            W = original[name]
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            B0 = U[:, -RANK:] * S[-RANK:].sqrt()
            A0 = S[-RANK:].sqrt()[:, None] * Vh[-RANK:]
            module.lora_B["default"].weight.copy_(B0)
            module.lora_A["default"].weight.copy_(A0)
            module.base_layer.weight.copy_(W - B0 @ A0)
            initial_delta[name] = (module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double())
    init_dir = root / "init_dir"
    peft_model.save_pretrained(init_dir / "milora_init")
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if name not in original:
                continue
            B = module.lora_B["default"].weight
            A = module.lora_A["default"].weight
            B.add_(0.05 * torch.randn(B.shape, generator=generator))
            A.add_(0.05 * torch.randn(A.shape, generator=generator))
            trained_delta[name] = B.double() @ A.double()
    trained_adapter = root / "trained_adapter"
    peft_model.save_pretrained(trained_adapter)
    residual = peft_model.unload()
    residual.save_pretrained(init_dir)
    tiny_tokenizer().save_pretrained(init_dir)
    return {
        "init_dir": init_dir,
        "trained_adapter": trained_adapter,
        "original": original,
        "initial_delta": initial_delta,
        "trained_delta": trained_delta,
    }
