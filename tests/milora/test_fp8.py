"""`milora.fp8`: frozen linear layers multiplying in FP8 with `torch._scaled_mm` (row-wise scales), checked against
float64 on CPU. FP8 e4m3 keeps 3 mantissa bits: each operand element is off by up to 2^-4 relative, a GEMM's
output by a few percent (relative Frobenius error ~0.03 on Gaussian data); the bounds below are 0.05."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from milora import apply_milora, merge_adapter
from milora.errors import MiLoRAError
from milora.fp8 import (
    FP8_DTYPE,
    Float8FrozenLinear,
    convert_frozen_linears_to_fp8,
    decoder_of,
    dequantize_rowwise,
    fp8_unsupported_reason,
    has_fp8_layers,
    plain_linears,
    quantize_rowwise,
    restore_linears,
)
from milora.regional_compile import compile_repeated_blocks
from milora.tiny import tiny_config, tiny_model
from tests.milora.conftest import LLAMA_TARGETS, relative_error

FP8_BOUND = 0.05
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


def frozen_linear(in_features=64, out_features=48, bias=True, dtype=torch.bfloat16, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype).requires_grad_(False)


def converted(linear: nn.Linear) -> nn.Linear:
    layer = copy.deepcopy(linear)
    layer.__class__ = Float8FrozenLinear
    return layer


def reference(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    out = x.double() @ linear.weight.double().t()
    return out if linear.bias is None else out + linear.bias.double()


def test_rowwise_quantization_uses_each_rows_range():
    t = torch.randn(5, 64, dtype=torch.float64) * torch.logspace(-3, 3, 5, dtype=torch.float64)[:, None]
    t[2] = 0
    values, scales = quantize_rowwise(t)
    assert values.dtype == FP8_DTYPE and scales.dtype == torch.float32 and scales.shape == (5, 1)
    largest = torch.finfo(FP8_DTYPE).max
    assert torch.equal(values.float().abs().amax(1)[[0, 1, 3, 4]], torch.full((4,), largest))
    assert torch.all(values[2].float() == 0) and torch.isfinite(scales).all() and scales[2] > 0
    rows = [0, 1, 3, 4]
    error = (dequantize_rowwise(values, scales).double() - t)[rows].abs()
    # e4m3 rounds a value to 3 mantissa bits (2^-4 relative) above its smallest normal 2^-6 (times the scale)
    bound = torch.maximum(t[rows].abs() * 2**-4, scales[rows].double() * 2**-10)
    assert torch.all(error <= bound * (1 + 1e-6))


def test_rowwise_quantization_saturates():
    t = torch.tensor([[1.0, -1.0, 0.5, 0.25] * 4])
    values, scales = quantize_rowwise(t)
    assert torch.isfinite(values.float()).all()
    assert float(values.float().max()) == torch.finfo(FP8_DTYPE).max and float(values.float().min()) == -448


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [7, 32])  # 7: padded to 16 rows for _scaled_mm and cut back
def test_forward_and_input_gradient_within_fp8_error(dtype, tokens):
    linear = frozen_linear(dtype=dtype)
    layer = converted(linear)
    x = torch.randn(2, tokens, 64, dtype=dtype, requires_grad=True)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, tokens, 48)
    assert relative_error(out, reference(x, linear)) < FP8_BOUND
    plain = linear(x)
    assert not torch.equal(out, plain), "the converted layer computes in FP8, not in its weights' dtype"
    assert relative_error(out, plain) > 1e-3

    grad = torch.randn_like(out)
    out.backward(grad)
    expected = grad.double() @ linear.weight.double()
    assert x.grad.dtype == dtype and relative_error(x.grad, expected) < FP8_BOUND
    assert layer.weight.grad is None and layer.bias.grad is None


def test_a_strided_input_gives_what_its_contiguous_copy_gives():
    layer = converted(frozen_linear())
    x = torch.randn(64, 2, 24, dtype=torch.bfloat16).permute(1, 2, 0)  # (2, 24, 64), features not innermost
    assert not x.is_contiguous()
    assert torch.equal(layer(x), layer(x.contiguous()))


def test_nothing_of_the_input_is_kept_for_backward():
    """An `nn.Linear` saves its input for the weight gradient; the FP8 layer saves no tensor at all."""
    linear = frozen_linear()
    x = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)

    def saved_by(layer) -> int:
        count = 0

        def pack(tensor):
            nonlocal count
            count += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            layer(x)
        return count

    linear_with_trained_weight = copy.deepcopy(linear).requires_grad_(True)
    assert saved_by(linear_with_trained_weight) >= 1
    assert saved_by(converted(linear)) == 0


def test_autocast_output_dtype_is_what_linear_gives():
    linear = frozen_linear(dtype=torch.float32)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert converted(linear)(x).dtype == linear(x).dtype == torch.bfloat16


def test_fp8_copies_follow_the_weight():
    layer = converted(frozen_linear(bias=False))
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(2)  # in place: the version counter moves
    assert relative_error(layer(x), 2 * before.double()) < 1e-2
    layer.weight.data = -layer.weight.data.clone()  # replaced, as a safe merge or a device move does
    assert relative_error(layer(x), -2 * before.double()) < 1e-2
    layer.float()  # casts the weight; the FP8 copies are not buffers, so nothing turns them into float32
    assert layer(x.float()).dtype == torch.float32


def test_fp8_copies_are_static_inputs_for_cuda_graphs():
    """made eagerly, the copies are marked as static addresses, so a CUDA graph of a compiled layer reads them in place
    (as it does parameters) instead of copying them into its buffers at every replay"""
    layer = converted(frozen_linear(bias=False))
    layer(torch.randn(16, 64, dtype=torch.bfloat16))
    copies = (layer.float8_rows, layer.float8_row_scales, layer.float8_columns, layer.float8_column_scales)
    assert all(getattr(copy, "_dynamo_static_input_type", None) == "unguarded" for copy in copies)


def test_trained_weight_takes_the_plain_linear():
    linear = frozen_linear().requires_grad_(True)
    layer = converted(linear)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(x), linear(x))
    layer(x).sum().backward()
    assert layer.weight.grad is not None


@pytest.fixture
def milora_model():
    return apply_milora(tiny_model("llama"), LLAMA_TARGETS, 8, method="milora", show_progress=False)


@pytest.fixture
def batch():
    ids = torch.randint(5, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def test_tiny_llama_dims_fit_fp8():
    config = tiny_config("llama")
    assert all(d % 16 == 0 for d in (config.hidden_size, config.intermediate_size,
                                      config.num_key_value_heads * config.hidden_size // config.num_attention_heads))


def test_conversion_takes_every_frozen_decoder_linear_and_nothing_else(milora_model):
    conversion = convert_frozen_linears_to_fp8(milora_model)
    layers = milora_model.config.num_hidden_layers
    assert len(conversion.converted) == LINEARS_PER_LAYER * layers and not conversion.skipped
    fp8 = {name for name, m in milora_model.named_modules() if isinstance(m, Float8FrozenLinear)}
    assert fp8 == set(conversion.converted)
    assert all(".layers." in name for name in fp8)
    adapted = [name for name in fp8 if name.endswith(".base_layer")]  # PEFT's wrappers keep theirs
    assert len(adapted) == len(LLAMA_TARGETS) * layers
    assert {"o_proj", "gate_proj"} <= {name.split(".")[-1] for name in fp8}, "the non-adapted layers too"
    assert not any("lora_" in name or "lm_head" in name for name in fp8)
    assert type(milora_model.get_base_model().lm_head) is nn.Linear
    assert milora_model.get_base_model().model.embed_tokens.weight.dtype == torch.float32


def test_llava_vision_tower_and_projector_stay():
    model = tiny_model("llava")
    model.requires_grad_(False)
    conversion = convert_frozen_linears_to_fp8(model)
    assert conversion.converted and all("language_model" in name for name in conversion.converted)
    assert not any(isinstance(m, Float8FrozenLinear) for m in model.model.vision_tower.modules())
    assert not any(isinstance(m, Float8FrozenLinear) for m in model.model.multi_modal_projector.modules())


def test_adapted_model_trains_close_to_the_unconverted_one(milora_model, batch):
    fp8_model = copy.deepcopy(milora_model)
    convert_frozen_linears_to_fp8(fp8_model)
    plain_loss, fp8_loss = milora_model(**batch).loss, fp8_model(**batch).loss
    assert abs(float(fp8_loss) - float(plain_loss)) < 0.01 * float(plain_loss)
    plain_loss.backward()
    fp8_loss.backward()
    plain_grads = {n: p.grad for n, p in milora_model.named_parameters() if p.requires_grad}
    fp8_grads = {n: p.grad for n, p in fp8_model.named_parameters() if p.requires_grad}
    assert plain_grads.keys() == fp8_grads.keys() and all("lora_" in n for n in fp8_grads)
    assert all(g is not None for g in fp8_grads.values())
    assert relative_error(torch.cat([g.flatten() for g in fp8_grads.values()]),
                          torch.cat([g.flatten() for g in plain_grads.values()])) < 0.1
    assert all(p.grad is None for p in fp8_model.parameters() if not p.requires_grad)

    optimizer = torch.optim.AdamW([p for p in fp8_model.parameters() if p.requires_grad], lr=1e-2)
    optimizer.step()
    assert float(fp8_model(**batch).loss) < float(fp8_loss)


def test_state_dict_and_merge_are_those_of_the_unconverted_model(milora_model, batch, tmp_path):
    fp8_model = copy.deepcopy(milora_model)
    convert_frozen_linears_to_fp8(fp8_model)
    optimizer = torch.optim.AdamW([p for p in fp8_model.parameters() if p.requires_grad], lr=1e-2)
    fp8_model(**batch).loss.backward()
    optimizer.step()
    # same keys, no FP8 copies: the unconverted model takes the trained state as it is
    milora_model.load_state_dict(fp8_model.state_dict(), strict=True)
    fp8_model.save_pretrained(tmp_path / "adapter")
    milora_model.save_pretrained(tmp_path / "plain_adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "plain_adapter" / "adapter_model.safetensors").read_bytes()

    expected = copy.deepcopy(milora_model).merge_and_unload()
    merged = copy.deepcopy(fp8_model).merge_and_unload()
    assert expected.state_dict().keys() == merged.state_dict().keys()
    assert all(torch.equal(expected.state_dict()[k], v) for k, v in merged.state_dict().items())

    restored = merge_adapter(fp8_model, tmp_path / "merged")  # restores the plain layers before merging
    assert not has_fp8_layers(restored)
    ids = batch["input_ids"]
    assert torch.equal(restored(input_ids=ids).logits, expected(input_ids=ids).logits)


def test_restore_and_plain_linears_give_back_the_exact_model(milora_model, batch):
    with torch.no_grad():
        expected = milora_model(**batch).logits
        convert_frozen_linears_to_fp8(milora_model)
        fp8 = milora_model(**batch).logits
        assert not torch.equal(fp8, expected)
        with plain_linears(milora_model):
            assert not has_fp8_layers(milora_model)
            assert torch.equal(milora_model(**batch).logits, expected)
        assert torch.equal(milora_model(**batch).logits, fp8)
        assert restore_linears(milora_model) == LINEARS_PER_LAYER * 2
        assert not decoder_of(milora_model)._forward_pre_hooks, "the FP8 copies' hook went with the layers"
        assert torch.equal(milora_model(**batch).logits, expected)


def test_layers_not_divisible_by_16_are_skipped_with_their_reason(caplog):
    config = LlamaConfig(vocab_size=261, hidden_size=64, intermediate_size=72, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="milora.fp8"):
        conversion = convert_frozen_linears_to_fp8(model)
    assert sorted(name.split(".")[-1] for name in conversion.skipped) == ["down_proj", "gate_proj", "up_proj"]
    assert len(conversion.converted) == 4
    assert "model.layers.0.mlp.gate_proj" in caplog.text and "out_features 72" in caplog.text


def test_refusals():
    with pytest.raises(MiLoRAError, match=r"model.layers.0.self_attn.q_proj holds float64 weights"):
        convert_frozen_linears_to_fp8(tiny_model("llama", dtype=torch.float64).requires_grad_(False))
    trained = tiny_model("llama")  # every weight trainable: nothing is frozen, nothing to convert
    with pytest.raises(MiLoRAError, match="no frozen nn.Linear"):
        convert_frozen_linears_to_fp8(trained)
    with pytest.raises(MiLoRAError, match="has no decoder"):
        convert_frozen_linears_to_fp8(nn.Sequential(nn.Linear(16, 16)))


def test_this_machine_needs_no_capability_refusal():
    if not torch.cuda.is_available():
        assert fp8_unsupported_reason() is None
    else:
        assert (fp8_unsupported_reason() is None) == (torch.cuda.get_device_capability() >= (8, 9))


def decoder_layer_calls(model, lengths) -> list[tuple[tuple, dict]]:
    """The arguments `model` calls its first decoder layer with, on a batch of each token count in `lengths`."""
    calls = []
    handle = decoder_of(model).layers[0].register_forward_pre_hook(
        lambda _, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    with torch.no_grad():
        for seed, tokens in enumerate(lengths):
            model(input_ids=torch.randint(5, 250, (2, tokens), generator=torch.Generator().manual_seed(seed)),
                  use_cache=False)
    handle.remove()
    return calls


def layer_output_and_input_grad(layer, call) -> tuple[torch.Tensor, torch.Tensor]:
    (hidden, *args), kwargs = call
    hidden = hidden.detach().clone().requires_grad_(True)
    out = layer(hidden, *args, **kwargs)
    out.backward(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)))
    return out.detach(), hidden.grad


def float8_copies(layer) -> list[torch.Tensor]:
    return [m.float8_rows for m in layer.modules() if isinstance(m, Float8FrozenLinear)]


def compiled_runs(layer, calls) -> tuple[list, int, int, list]:
    """Output and input gradient of `layer` compiled in place (aot_eager) for each call; the graph breaks and graphs
    that took, and the layer's FP8 copies after each call."""
    torch._dynamo.reset()
    counters.clear()
    layer.compile(backend="aot_eager")
    runs, copies = [], []
    for call in calls:
        runs.append(layer_output_and_input_grad(layer, call))
        copies.append(float8_copies(layer))
    return runs, sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"], copies


@pytest.mark.parametrize(("dtype", "copies_made_eagerly"), [(torch.bfloat16, True), (torch.float32, False)])
def test_compiled_decoder_layer_takes_the_fp8_layers_into_its_graph(dtype, copies_made_eagerly):
    """A decoder layer compiled with its frozen linears in FP8 breaks its graph no more often and compiles no more
    graphs than with plain linears, whether the FP8 copies were made by an eager forward (as the step-0 check
    makes them) or are made by the first compiled one; later graphs take them as inputs, not quantizing the weights
    again. It computes what the eager FP8 layer computes: output and input gradient, over token counts that need
    padding and not."""
    model = apply_milora(tiny_model("llama", dtype=dtype), LLAMA_TARGETS, 4, show_progress=False).eval()
    calls = decoder_layer_calls(model, [24, 13, 19])  # 48, 26, 38 rows: 26 and 38 padded to 32 and 48
    layer = decoder_of(model).layers[0]
    plain, plain_breaks, plain_graphs, _ = compiled_runs(copy.deepcopy(layer), calls)
    convert_frozen_linears_to_fp8(model)
    eager = [layer_output_and_input_grad(layer, call) for call in calls]
    assert relative_error(eager[0][0], plain[0][0]) > 1e-4, "the layer computes in FP8"
    compiled_layer = copy.deepcopy(layer)
    if not copies_made_eagerly:
        for module in compiled_layer.modules():
            if isinstance(module, Float8FrozenLinear):
                module.drop_float8_copies()
    compiled, fp8_breaks, fp8_graphs, copies = compiled_runs(compiled_layer, calls)
    assert fp8_breaks <= plain_breaks and fp8_graphs <= plain_graphs
    assert all(a is b for later in copies[1:] for a, b in zip(copies[0], later, strict=True))
    for (out, grad), (expected_out, expected_grad) in zip(compiled, eager, strict=True):
        assert relative_error(out, expected_out) <= 1e-6 and relative_error(grad, expected_grad) <= 1e-6


def checkpointed_model(fp8: bool):
    model = apply_milora(tiny_model("llama"), LLAMA_TARGETS, 4, lora_dropout=0.0, show_progress=False)
    if fp8:
        convert_frozen_linears_to_fp8(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def test_the_decoder_makes_the_fp8_copies_before_its_compiled_layers_run(batch):
    """Inside a model the decoder's pre-hook makes the FP8 copies eagerly, before the compiled layers run: no graph
    break with activation checkpointing (where a copy made in the graph would be a refused side effect), and a
    frozen weight changed in place reaches the compiled layers."""
    breaks, graphs = {}, {}
    for fp8 in (False, True):
        model = checkpointed_model(fp8)
        eager = copy.deepcopy(model)
        torch._dynamo.reset()
        counters.clear()
        compile_repeated_blocks(model, backend="aot_eager")
        for tokens in (24, 13):
            ids = batch["input_ids"][:, :tokens]
            model(input_ids=ids, labels=ids).loss.backward()
        breaks[fp8], graphs[fp8] = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
    assert breaks[True] <= breaks[False] and graphs[True] <= graphs[False]
    before = float(model(**batch).loss)
    losses = []
    for twin in (model, eager):
        with torch.no_grad():
            twin.get_base_model().model.layers[0].mlp.gate_proj.weight.mul_(2)
        losses.append(twin(**batch).loss)
    assert relative_error(losses[0], losses[1]) <= 1e-6
    assert abs(float(losses[0]) - before) > 1e-4, "the changed weight reached the compiled layer"
