"""milora.autocast: under autocast a LoRA layer's input skips PEFT's float32 round trip, with the same loss and
gradients; outside autocast PEFT's cast is kept (a bfloat16 model with float32 adapters still runs)."""

from __future__ import annotations

import pytest
import torch

from milora import apply_milora
from milora.autocast import skip_input_casts_under_autocast
from milora.tiny import tiny_model
from tests.milora.conftest import LLAMA_TARGETS


def _bf16_model_with_fp32_adapters(dropout: float):
    torch.manual_seed(0)
    model = apply_milora(tiny_model("llama").to(torch.bfloat16), LLAMA_TARGETS, 4, method="milora",
                         lora_dropout=dropout, show_progress=False)
    adapter = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert adapter.dtype == torch.float32  # PEFT's autocast_adapter_dtype: the mixed-precision setting
    return model.train()


def _loss_and_grads(model, input_ids):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _dropout_input_dtypes(model, run):
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
             for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return set(seen)


def test_same_loss_and_gradients_without_the_float32_round_trip(input_ids):
    model = _bf16_model_with_fp32_adapters(dropout=0.0)
    skipped = _loss_and_grads(model, input_ids)
    assert _dropout_input_dtypes(model, lambda: _loss_and_grads(model, input_ids)) == {torch.bfloat16}

    assert skip_input_casts_under_autocast(model, enabled=False) == 5 * 2  # PEFT's behaviour, back
    assert _dropout_input_dtypes(model, lambda: _loss_and_grads(model, input_ids)) == {torch.float32}
    cast = _loss_and_grads(model, input_ids)
    assert torch.equal(skipped[0], cast[0])
    assert skipped[1].keys() == cast[1].keys() and len(cast[1]) == 2 * 5 * 2
    for name, grad in cast[1].items():
        assert torch.equal(skipped[1][name], grad), name


def test_dropout_still_applies_under_autocast(input_ids):
    model = _bf16_model_with_fp32_adapters(dropout=0.5)
    torch.manual_seed(1)
    first = _loss_and_grads(model, input_ids)[0]
    torch.manual_seed(2)
    assert not torch.equal(first, _loss_and_grads(model, input_ids)[0])  # a different mask, a different loss
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        a = model(input_ids=input_ids).logits
        b = model(input_ids=input_ids).logits
    assert torch.equal(a, b)


def test_outside_autocast_peft_still_casts(input_ids):
    model = _bf16_model_with_fp32_adapters(dropout=0.0).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=input_ids)  # leaves the layers with the cast off
    with torch.no_grad():  # bfloat16 activations, float32 adapters: runs only with PEFT's cast
        logits = model(input_ids=input_ids).logits
    assert torch.isfinite(logits).all()
    assert _dropout_input_dtypes(model, lambda: model(input_ids=input_ids)) == {torch.float32}


@pytest.mark.parametrize("method", ["lora", "milora"])
def test_installed_once_by_apply_milora_and_load_init_dir(method, tmp_path):
    from milora import load_init_dir, save_init_dir

    model = apply_milora(tiny_model("llama"), LLAMA_TARGETS, 4, method=method, show_progress=False)
    assert skip_input_casts_under_autocast(model) == 5 * 2  # idempotent: no second hook
    hooks = [m for m in model.modules() if getattr(m, "_milora_autocast_cast_hook", None) is not None]
    assert len(hooks) == 10 and all(len(m._forward_pre_hooks) == 1 for m in hooks)
    if method == "milora":
        save_init_dir(model, tmp_path / "init")
        loaded = load_init_dir(tmp_path / "init")
        assert sum(getattr(m, "_milora_autocast_cast_hook", None) is not None for m in loaded.modules()) == 10
