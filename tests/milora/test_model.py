"""`apply_milora` on real PEFT layers: factors, output preservation, trainability, scoping, errors."""

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from milora import (
    METHODS,
    MiLoRAError,
    apply_milora,
    method_of_mode,
    normalize_mode,
    resolve_target_modules,
)
from milora.init_dir import residual_state_dict
from milora.model import method_of_model
from milora.tiny import tiny_model

from .conftest import LLAMA_TARGETS, relative_error


def lora_layers(peft_model):
    return {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("method", ["milora", "pissa", "mid", "random"])
def test_output_unchanged_at_init_float32(llama, input_ids, method):
    with torch.no_grad():
        reference = llama(input_ids).logits
    original = {n: m.weight.detach().double().clone() for n, m in llama.named_modules() if n.endswith("q_proj")}
    peft_model = apply_milora(llama, LLAMA_TARGETS, 4, method=method, show_progress=False)
    with torch.no_grad():
        logits = peft_model(input_ids).logits
    assert relative_error(logits, reference) <= 1e-5
    # the frozen base really changed (it is the residual), so this is not a no-op
    for name, layer in lora_layers(peft_model).items():
        if name.endswith("q_proj"):
            base_name = name.removeprefix("base_model.model.")
            assert not torch.allclose(layer.get_base_layer().weight.double(), original[base_name])


def test_factors_are_the_float64_minor_components(llama):
    weights = {n: m.weight.detach().double().clone() for n, m in llama.named_modules() if n.endswith("proj")}
    peft_model = apply_milora(llama, LLAMA_TARGETS, 4, show_progress=False)
    layers = lora_layers(peft_model)
    assert len(layers) == 2 * len(LLAMA_TARGETS)
    for name, layer in layers.items():
        W = weights[name.removeprefix("base_model.model.")]
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        B = layer.lora_B["default"].weight.double()
        A = layer.lora_A["default"].weight.double()
        expected = (U[:, -4:] * S[-4:]) @ Vh[-4:]
        torch.testing.assert_close(B @ A, expected, atol=1e-6 * float(S[0]), rtol=0)
        torch.testing.assert_close(torch.linalg.svdvals(B @ A)[:4], S[-4:], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(layer.get_base_layer().weight.double() + B @ A, W, atol=1e-6, rtol=0)


def test_custom_alpha_still_preserves_output(llama, input_ids):
    with torch.no_grad():
        reference = llama(input_ids).logits
    peft_model = apply_milora(llama, LLAMA_TARGETS, 4, lora_alpha=16, show_progress=False)
    assert peft_model.peft_config["default"].lora_alpha == 16
    with torch.no_grad():
        assert relative_error(peft_model(input_ids).logits, reference) <= 1e-5


def test_bfloat16_output_within_documented_bound(input_ids):
    model = tiny_model("llama", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        reference = model(input_ids).logits.float()
    peft_model = apply_milora(model, LLAMA_TARGETS, 4, show_progress=False)
    with torch.no_grad():
        logits = peft_model(input_ids).logits.float()
    # documented in the README: bf16 residual rounding, relative error <= 2e-2
    assert relative_error(logits, reference) <= 2e-2


def test_only_lora_factors_are_trainable(llama):
    peft_model = apply_milora(llama, LLAMA_TARGETS, 4, show_progress=False)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_plain_lora_keeps_base_weights(llama, input_ids):
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    peft_model = apply_milora(llama, LLAMA_TARGETS, 4, method="lora", show_progress=False)
    assert peft_model.peft_config["default"].lora_alpha == 8  # 2r, the paper's LoRA baseline
    for name, layer in lora_layers(peft_model).items():
        key = name.removeprefix("base_model.model.") + ".weight"
        assert torch.equal(layer.get_base_layer().weight, before[key])
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_gpt2_conv1d_fan_in_fan_out(input_ids):
    model = tiny_model("gpt2").eval()
    with torch.no_grad():
        reference = model(input_ids).logits
    weight = model.transformer.h[0].attn.c_attn.weight.detach().double().clone()  # (in, out)
    peft_model = apply_milora(model, ["c_attn", "c_fc"], 4, show_progress=False)
    assert peft_model.peft_config["default"].fan_in_fan_out
    with torch.no_grad():
        assert relative_error(peft_model(input_ids).logits, reference) <= 1e-5
    layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    BA = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
    S = torch.linalg.svdvals(weight.T)
    torch.testing.assert_close(torch.linalg.svdvals(BA)[:4], S[-4:], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind,targets", [("qwen2", LLAMA_TARGETS), ("bert", ["query", "key", "value"])])
def test_other_architectures(kind, targets, input_ids):
    model = tiny_model(kind).eval()
    with torch.no_grad():
        reference = model(input_ids).logits
    peft_model = apply_milora(model, targets, 4, show_progress=False)
    with torch.no_grad():
        assert relative_error(peft_model(input_ids).logits, reference) <= 1e-5


def test_llava_adapts_language_model_only():
    model = tiny_model("llava").eval()
    vision_before = {n: p.detach().clone() for n, p in model.model.vision_tower.named_parameters()}
    projector_before = {n: p.detach().clone() for n, p in model.model.multi_modal_projector.named_parameters()}
    input_ids = torch.randint(5, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    input_ids[:, 1:17] = model.config.image_token_id
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=input_ids, pixel_values=pixel_values).logits
    # q_proj/k_proj/v_proj also exist in the CLIP vision tower
    names = resolve_target_modules(model, ["q_proj", "k_proj", "v_proj"])
    assert names and all(n.startswith("model.language_model.") for n in names)
    peft_model = apply_milora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], 4, show_progress=False)
    adapted = list(lora_layers(peft_model))
    assert len(adapted) == 8 and all(".language_model." in n for n in adapted)
    vision_tower = peft_model.base_model.model.model.vision_tower
    assert all(torch.equal(p, vision_before[n]) for n, p in vision_tower.named_parameters())
    assert all(
        torch.equal(p, projector_before[n])
        for n, p in peft_model.base_model.model.model.multi_modal_projector.named_parameters()
    )
    with torch.no_grad():
        logits = peft_model(input_ids=input_ids, pixel_values=pixel_values).logits
    assert relative_error(logits, reference) <= 1e-5


def test_regex_and_all_linear_targets(llama):
    assert resolve_target_modules(llama, r".*\.0\.self_attn\.(q|v)_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
    ]
    names = resolve_target_modules(llama, "all-linear")
    assert "lm_head" not in names and len(names) == 2 * 7


def test_adapter_reloads_with_peft(llama, input_ids, tmp_path):
    peft_model = apply_milora(llama, "q_proj,v_proj", 4, show_progress=False)
    with torch.no_grad():
        for layer in lora_layers(peft_model).values():
            layer.lora_B["default"].weight.add_(0.01)  # a trained-looking adapter
        expected = peft_model(input_ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    # the adapter applies to the residual base: rebuild that as a plain model, then load with PEFT
    residual = tiny_model("llama").eval()
    residual.load_state_dict(residual_state_dict(peft_model))
    reloaded = PeftModel.from_pretrained(residual, tmp_path / "adapter")
    with torch.no_grad():
        assert relative_error(reloaded(input_ids).logits, expected) <= 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_deprecated_mode_alias_warns_and_builds_the_same_model(method, input_ids):
    mode = {"milora": "minor", "pissa": "principal"}.get(method, method)  # mode= also took spectrum slices
    with pytest.warns(FutureWarning, match=f"mode='{mode}' is deprecated .* pass method='{method}'"):
        by_mode = apply_milora(tiny_model("llama"), ["q_proj"], 4, mode=mode, show_progress=False)
    by_method = apply_milora(tiny_model("llama"), ["q_proj"], 4, method=method, show_progress=False)
    state = dict(by_mode.named_parameters())
    for name, param in by_method.named_parameters():
        assert torch.equal(param, state[name]), name  # plain LoRA too: tiny_model seeds PEFT's random A
    assert method_of_mode(normalize_mode(method)) == method
    assert method_of_model(by_mode) == method_of_model(by_method) == method


class TestErrors:
    def test_mode_and_method_that_disagree(self, llama):
        with pytest.raises(MiLoRAError, match="mode='principal' and method='milora' disagree"), \
                pytest.warns(FutureWarning):
            apply_milora(llama, ["q_proj"], 4, mode="principal", method="milora", show_progress=False)

    def test_unknown_method(self, llama):
        with pytest.raises(MiLoRAError, match="unknown method 'minor'; choose one of milora, pissa"):
            apply_milora(llama, ["q_proj"], 4, method="minor", show_progress=False)


    def test_targets_matching_nothing_list_existing_names(self, llama):
        with pytest.raises(MiLoRAError, match=r"matched no module.*q_proj"):
            apply_milora(llama, ["query_key_value"], 4, show_progress=False)

    def test_rank_too_large_names_the_layer(self, llama):
        message = r"model\.layers\.0\.self_attn\.k_proj: rank r=40 .* smaller dimension 32"
        with pytest.raises(MiLoRAError, match=message):
            apply_milora(llama, ["k_proj"], 40, show_progress=False)

    def test_non_linear_target(self, llama):
        with pytest.raises(MiLoRAError, match="not a linear layer"):
            apply_milora(llama, ["self_attn"], 4, show_progress=False)

    def test_non_float_weights(self, llama):
        layer = llama.model.layers[0].self_attn.q_proj
        layer.weight = torch.nn.Parameter(layer.weight.data.to(torch.int8), requires_grad=False)
        with pytest.raises(MiLoRAError, match="not a float type.*milora init"):
            apply_milora(llama, ["q_proj"], 4, show_progress=False)

    def test_nan_weights(self, llama):
        with torch.no_grad():
            llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
        with pytest.raises(MiLoRAError, match=r"layers\.1\.mlp\.up_proj: the weight holds NaN"):
            apply_milora(llama, LLAMA_TARGETS, 4, show_progress=False)

    def test_unknown_mode(self, llama):
        with pytest.raises(MiLoRAError, match="unknown mode 'smallest'"):
            apply_milora(llama, LLAMA_TARGETS, 4, mode="smallest", show_progress=False)

    def test_already_wrapped(self, llama):
        peft_model = apply_milora(llama, ["q_proj"], 4, show_progress=False)
        with pytest.raises(MiLoRAError, match="already carries LoRA"):
            apply_milora(peft_model, ["q_proj"], 4, show_progress=False)


def test_svd_methods_fill_adapters_made_without_values():
    """For the SVD methods the LoRA weights are made on the meta device (PEFT draws no random values for them)
    and become the factors: PEFT's adapter dtype (float32 beside a bf16 base), the base weight's device,
    trainable; plain LoRA keeps PEFT's own init."""
    from milora.distributed import lora_layers
    from milora.model import wrap_model

    wrapped = wrap_model(tiny_model("llama", dtype=torch.bfloat16), LLAMA_TARGETS, 4, adapter_values=False)
    assert all(layer.lora_A["default"].weight.is_meta and layer.lora_B["default"].weight.is_meta
               for _, layer in lora_layers(wrapped))
    model = apply_milora(tiny_model("llama", dtype=torch.bfloat16), LLAMA_TARGETS, 4, show_progress=False)
    for _, layer in lora_layers(model):
        for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            assert weight.dtype == torch.float32 and weight.device == layer.get_base_layer().weight.device
            assert weight.requires_grad and weight.is_contiguous() and torch.isfinite(weight).all()
            assert weight.abs().sum() > 0
    lora = apply_milora(tiny_model("llama", dtype=torch.bfloat16), LLAMA_TARGETS, 4, method="lora")
    assert set(model.get_base_model().state_dict()) == set(lora.get_base_model().state_dict())
    assert all(float(layer.lora_B["default"].weight.abs().sum()) == 0 for _, layer in lora_layers(lora))
