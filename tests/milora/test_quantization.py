"""4-bit bases (QLoRA, QPiSSA, QMiLoRA) on real bitsandbytes layers, on CPU: the decomposition reads the
full-precision weights, the model at init computes exactly dequant(Q(W - s B A)) + s B A, quantized layers are
never decomposed, QPiSSA's refits lower the error, the merge is the dequantized residual plus the update."""

import pytest
import torch
from peft.tuners.lora import LoraLayer

from milora import MiLoRAError, apply_milora, load_init_dir, save_init_dir
from milora.decomposition import subspace_overlap
from milora.quantization import (
    FourBitSettings,
    dequantized_weight,
    merge_dequantized,
    quantization_error,
    quantize_dequantize,
    refit_factors,
    skipped_module_names,
)
from milora.tiny import tiny_model

from .conftest import LLAMA_TARGETS

pytest.importorskip("bitsandbytes")

R = 4
NF4 = FourBitSettings("nf4")


def adapted(peft_model):
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def factors(layer):
    B = layer.lora_B["default"].weight.detach().double()
    A = layer.lora_A["default"].weight.detach().double()
    return B, A, layer.scaling["default"]


def float64_slice(weight, mode, r=R):
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    pick = slice(0, r) if mode == "principal" else slice(S.shape[0] - r, S.shape[0])
    return (U[:, pick] * S[pick]) @ Vh[pick]


@pytest.mark.parametrize("method,mode", [("milora", "minor"), ("pissa", "principal")])
def test_factors_are_the_float64_slice_of_the_full_precision_weights(method, mode):
    original = {n: m.weight.detach().clone() for n, m in tiny_model("llama").named_modules() if hasattr(m, "weight")}
    peft_model = apply_milora(tiny_model("llama"), LLAMA_TARGETS, R, method=method, quantization=NF4,
                              show_progress=False)
    layers = adapted(peft_model)
    assert len(layers) == 10
    for name, layer in layers.items():
        assert layer.get_base_layer().weight.dtype == torch.uint8  # the base is 4-bit
        B, A, s = factors(layer)
        expected = float64_slice(original[name], mode)
        assert torch.allclose(s * B @ A, expected, atol=1e-5 * expected.abs().max())


@pytest.mark.parametrize("method", ["milora", "pissa", "mid", "random", "lora"])
def test_output_at_init_is_the_quantized_residual_plus_the_factors(method):
    original = {n: m.weight.detach().clone() for n, m in tiny_model("llama").named_modules() if hasattr(m, "weight")}
    peft_model = apply_milora(tiny_model("llama"), LLAMA_TARGETS, R, method=method, quantization=NF4,
                              show_progress=False).eval()
    x = torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(1))
    for name, layer in adapted(peft_model).items():
        B, A, s = factors(layer)
        w = original[name].double()
        residual = (w - s * B @ A).to(torch.float32)
        reference = quantize_dequantize(residual, NF4).double() + s * B @ A
        inputs = x[..., : w.shape[1]]
        with torch.no_grad():
            out = layer(inputs).double()
        expected = inputs.double() @ reference.T
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())), name
        if method == "lora":
            assert float((B @ A).abs().max()) == 0.0  # QLoRA: the adapter starts at zero, the base is Q(W)
        else:
            assert not torch.allclose(reference, w, atol=1e-3)  # quantized for real


def test_every_linear_layer_of_the_language_model_is_quantized_but_the_output_layer():
    peft_model = apply_milora(tiny_model("llama"), ["q_proj"], R, method="milora", quantization=NF4,
                              show_progress=False)
    base = peft_model.get_base_model()
    assert type(base.lm_head) is torch.nn.Linear
    assert base.model.layers[0].mlp.gate_proj.weight.dtype == torch.uint8
    assert base.model.layers[0].self_attn.o_proj.weight.dtype == torch.uint8


def test_llava_quantizes_the_language_tower_only_and_merges_to_a_plain_checkpoint():
    peft_model = apply_milora(tiny_model("llava"), ["q_proj", "v_proj"], R, method="milora", quantization=NF4,
                              modules_to_save=["multi_modal_projector"], show_progress=False)
    quantized = [n for n, m in peft_model.named_modules() if getattr(m, "weight", None) is not None
                 and m.weight.dtype == torch.uint8 and not isinstance(m, LoraLayer)]
    assert quantized and all(".language_model." in n for n in quantized)
    vision = [m for n, m in peft_model.named_modules() if "vision_tower" in n and isinstance(m, torch.nn.Linear)]
    assert vision and all(m.weight.dtype == torch.float32 for m in vision)
    assert "vision_tower" in skipped_module_names(True) and "vision_tower" not in skipped_module_names(False)
    merged = merge_dequantized(peft_model, torch.float32)  # the LLaVA recipe trains the projector in full
    assert set(merged.state_dict()) == set(tiny_model("llava").state_dict())


def load_quantized(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "base")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=NF4.bnb_config(["lm_head"]))


@pytest.mark.parametrize("method", ["milora", "pissa", "mid", "random"])
def test_an_already_quantized_layer_is_never_decomposed(tmp_path, method):
    with pytest.raises(MiLoRAError, match="already quantized.*full-precision checkpoint"):
        apply_milora(load_quantized(tmp_path), LLAMA_TARGETS, R, method=method, show_progress=False)


def test_plain_lora_trains_on_a_model_loaded_in_4bit(tmp_path):
    peft_model = apply_milora(load_quantized(tmp_path), LLAMA_TARGETS, R, method="lora", show_progress=False)
    ids = torch.randint(5, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert len(grads) == 10 and all(g is not None for g in grads)


def test_qpissa_refits_lower_the_quantization_error_and_leave_the_minor_subspace():
    weight = tiny_model("llama").model.layers[0].mlp.up_proj.weight.detach().double()  # 96 x 64
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)

    def error(B, A):
        res = quantize_dequantize((weight - B @ A).to(torch.float32), NF4)
        squared, norm = quantization_error(weight, res, B, A)
        return (squared / norm) ** 0.5

    root = S[:R].sqrt()
    B0, A0 = U[:, :R] * root, root[:, None] * Vh[:R]
    B5, A5 = refit_factors(weight, B0, A0, 1.0, 5, NF4, torch.float32)
    assert error(B5, A5) < error(B0, A0)
    rootm = S[-R:].sqrt()
    Bm, Am = U[:, -R:] * rootm, rootm[:, None] * Vh[-R:]
    Bm5, _ = refit_factors(weight, Bm, Am, 1.0, 5, NF4, torch.float32)
    assert subspace_overlap(Bm, U[:, -R:]) > 0.999
    assert subspace_overlap(Bm5, U[:, -R:]) < 0.9  # the refits pull MiLoRA's factors away from the minor subspace


def test_qpissa_iterations_in_apply_milora_change_the_factors_and_keep_the_model_exact():
    peft0 = apply_milora(tiny_model("llama"), ["up_proj"], R, method="pissa", quantization=NF4, show_progress=False)
    peft5 = apply_milora(tiny_model("llama"), ["up_proj"], R, method="pissa", quantization=NF4,
                         quantization_iterations=5, show_progress=False)
    weight = tiny_model("llama").model.layers[0].mlp.up_proj.weight.detach().double()
    errors = []
    for peft_model in (peft0, peft5):
        layer = adapted(peft_model)["model.layers.0.mlp.up_proj"]
        B, A, s = factors(layer)
        squared, norm = quantization_error(weight, dequantized_weight(layer.get_base_layer(), torch.float64), B, A, s)
        errors.append((squared / norm) ** 0.5)
    assert errors[1] < errors[0]
    with pytest.raises(MiLoRAError, match="quantization_iterations"):
        apply_milora(tiny_model("llama"), ["up_proj"], R, method="lora", quantization=NF4, quantization_iterations=2)


def test_merge_is_the_dequantized_residual_plus_the_update():
    peft_model = apply_milora(tiny_model("llama"), LLAMA_TARGETS, R, method="milora", quantization=NF4,
                              show_progress=False)
    expected = {}
    with torch.no_grad():
        for name, layer in adapted(peft_model).items():
            layer.lora_B["default"].weight.add_(0.01)  # a trained adapter: B A != B0 A0
            B, A, s = factors(layer)
            expected[name] = dequantized_weight(layer.get_base_layer(), torch.float64) + s * B @ A
    other = dequantized_weight(peft_model.get_base_model().model.layers[1].mlp.gate_proj, torch.float32)
    merged = merge_dequantized(peft_model, torch.float32)
    assert not any(hasattr(getattr(m, "weight", None), "quant_state") for m in merged.modules())
    for name, weight in expected.items():
        got = merged.get_submodule(name).weight
        assert got.dtype == torch.float32 and torch.allclose(got.double(), weight, atol=1e-6)
    assert torch.equal(merged.model.layers[1].mlp.gate_proj.weight, other)


def test_an_init_directory_loaded_in_4bit_is_the_same_model(tmp_path):
    quantized = apply_milora(tiny_model("llama"), LLAMA_TARGETS, R, method="milora", quantization=NF4,
                             show_progress=False)
    save_init_dir(apply_milora(tiny_model("llama"), LLAMA_TARGETS, R, method="milora", show_progress=False),
                  tmp_path / "init")
    loaded = load_init_dir(tmp_path / "init", dtype="float32", quantization_config=NF4.bnb_config(["lm_head"]))
    ours, theirs = adapted(quantized), adapted(loaded)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(dequantized_weight(ours[name].get_base_layer(), torch.float32),
                           dequantized_weight(theirs[name].get_base_layer(), torch.float32)), name
        assert torch.allclose(ours[name].lora_A["default"].weight, theirs[name].lora_A["default"].weight)


def test_only_bitsandbytes_missing_kernels_notice_is_dropped(caplog):
    import logging

    from milora import BITSANDBYTES_CPU_KERNELS_NOTICE

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(f"{BITSANDBYTES_CPU_KERNELS_NOTICE}: No module named 'kernels'. Please ...")
        logger.warning("another bitsandbytes warning")
    assert [record.getMessage() for record in caplog.records] == ["another bitsandbytes warning"]


def test_importing_peft_after_milora_prints_no_bitsandbytes_notice():
    import subprocess
    import sys
    from pathlib import Path

    code = "import milora, peft, bitsandbytes; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert "kernels-community" not in result.stderr
