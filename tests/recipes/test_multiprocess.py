"""Recipes on two processes, launched as on GPUs (`accelerate launch --config_file
deepspeed_configs/accelerate_X.yaml --num_processes 2`): plain DDP, DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 with
offload, each with `method: milora` and no `milora_init_dir` on the tiny recipe; the tiny LLaVA recipe under
ZeRO-3; resuming under ZeRO-2 and ZeRO-3.

DeepSpeed runs on its CPU accelerator (DS_ACCELERATOR=cpu, gloo); on GPUs the same commands run without it and
the process count is the only thing to change. One launch per launcher, shared by the assertions about it.
DeepSpeed compiles a small communication op on its first use on a machine (85 s on two busy cores, then cached
in the torch extensions directory); the offload test swaps DeepSpeed's CPUAdam, a further op to compile, for
torch's AdamW (`zero_force_ds_cpu_optimizer: false`), with the same parameter and optimizer offload.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from milora import apply_milora
from milora.init_dir import residual_state_dict
from milora.tiny import tiny_model

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "deepspeed_configs"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
LLAVA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS, SAVE_STEPS = 4, 2
TINY_ROWS, EFFECTIVE_BATCH = 320, 16  # recipes/data/tiny_math.jsonl, recipes/tiny_milora.yaml

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed"),
    pytest.mark.skipif(shutil.which("ninja") is None, reason="DeepSpeed's CPU ops need ninja to build"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _offload_config_with_torch_adamw(tmp_dir: Path) -> Path:
    """accelerate_zero3_offload.yaml's DeepSpeed JSON, allowed to offload torch's AdamW (see the module doc)."""
    config = json.loads((CONFIGS / "ds_zero3_offload.json").read_text())
    config["zero_force_ds_cpu_optimizer"] = False
    path = tmp_dir / "ds_zero3_offload_torch_adamw.json"
    path.write_text(json.dumps(config))
    return path


def _launcher(name: str, tmp_dir: Path) -> list[str]:
    args = ["--config_file", str(CONFIGS / f"accelerate_{name}.yaml")]
    if name == "zero3_offload":
        args += ["--deepspeed_config_file", str(_offload_config_with_torch_adamw(tmp_dir))]
    return args


def launch_command(launcher: str, processes: list[str], recipe: str, out_dir: Path, *overrides: str) -> list[str]:
    """`accelerate launch LAUNCHER PROCESSES recipes/sft.py RECIPE ...`, to run from the repository root."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", *_launcher(launcher, out_dir.parent), *processes,
        "recipes/sft.py", recipe, "--output_dir", str(out_dir), "--logging_steps", "1", "--report_to", "none",
        *overrides,
    ]


def launch_environment() -> dict[str, str]:
    """DeepSpeed's CPU accelerator, one thread per process (the same float32 arithmetic in every process), offline;
    a process killed by a signal prints its Python threads' stacks into the log (faulthandler)."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "1"}


def launch(launcher: str, recipe: str, out_dir: Path, *overrides: str, extra_env: dict | None = None,
           expect_success: bool = True) -> subprocess.CompletedProcess:
    """`accelerate launch LAUNCHER --num_processes 2 recipes/sft.py RECIPE ...`, from the repository root, in a
    session of its own (a test may kill the whole run)."""
    processes = ["--num_processes", "2", "--main_process_port", str(_free_port())]
    command = launch_command(launcher, processes, recipe, out_dir, *overrides)
    result = subprocess.run(command, cwd=REPO_ROOT, env={**launch_environment(), **(extra_env or {})},
                            capture_output=True, text=True, timeout=900, start_new_session=True)
    if expect_success:
        assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return result


def train_tiny(launcher: str, out_dir: Path, *overrides: str) -> Path:
    launch(launcher, "recipes/tiny_milora.yaml", out_dir, "--max_steps", str(STEPS), "--save_steps", str(SAVE_STEPS),
           *overrides)
    return out_dir


@pytest.fixture(scope="module", params=["ddp", "zero2", "zero3", "zero3_offload"])
def run(request, tmp_path_factory) -> tuple[str, Path]:
    """(launcher, output directory) of one finished two-process run of the tiny MiLoRA recipe."""
    out_dir = tmp_path_factory.mktemp(request.param) / "out"
    return request.param, train_tiny(request.param, out_dir)


def logged_losses(out_dir: Path) -> dict[int, float]:
    state = json.loads((out_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def minor_product(weight: torch.Tensor, r: int) -> torch.Tensor:
    """U_m S_m V_m^T of the last r singular triplets, by float64 SVD."""
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (U[:, -r:] * S[-r:]) @ Vh[-r:]


def check_initial_adapter(out_dir: Path, model: torch.nn.Module) -> None:
    """The saved initial adapter holds B A = the float64 minor components of each adapted weight."""
    initial = load_file(str(out_dir / "milora_init_adapter" / "adapter_model.safetensors"))
    weights = dict(model.named_parameters())
    a_keys = [k for k in initial if ".lora_A." in k]
    assert a_keys
    for key in a_keys:
        A, B = initial[key].double(), initial[key.replace(".lora_A.", ".lora_B.")].double()
        weight = weights[key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")]
        expected = minor_product(weight.detach(), A.shape[0])
        assert float((B @ A - expected).abs().max()) <= 1e-5 * float(expected.abs().max()), key


def trained_model(kind: str, out_dir: Path, targets: list[str]) -> PeftModel:
    """The trained model rebuilt here: the residual base of a one-process MiLoRA init plus the saved adapter."""
    initialised = apply_milora(tiny_model(kind), targets, 8, show_progress=False)
    residual = tiny_model(kind)
    residual.load_state_dict(residual_state_dict(initialised), strict=False)
    return PeftModel.from_pretrained(residual, out_dir / "residual_adapter").eval()


def text_inputs() -> dict:
    return {"input_ids": torch.randint(5, 250, (2, 24), generator=torch.Generator().manual_seed(0))}


def image_inputs() -> dict:
    inputs = text_inputs()
    inputs["input_ids"][:, 1:17] = 4  # tiny LLaVA's image token: 16 patches
    inputs["pixel_values"] = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return inputs


def check_outputs_reproduce_training(out_dir: Path, kind: str, targets: list[str], inputs: dict) -> None:
    """merged/ and the output folder's standard LoRA (on the ORIGINAL base) both give the trained model's logits,
    and the adapter moved away from its initial values."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    trained = trained_model(kind, out_dir, targets)
    initial = load_file(str(out_dir / "milora_init_adapter" / "adapter_model.safetensors"))
    final = load_file(str(out_dir / "residual_adapter" / "adapter_model.safetensors"))
    assert sorted(final) == sorted(initial)
    assert any(not torch.equal(final[k], initial[k]) for k in final if ".lora_B." in k)
    model_class = LlavaForConditionalGeneration if kind == "llava" else AutoModelForCausalLM
    merged = model_class.from_pretrained(out_dir / "merged").eval()
    converted = PeftModel.from_pretrained(tiny_model(kind), out_dir).eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
        assert relative_error(merged(**inputs).logits, expected) <= 1e-5
        assert relative_error(converted(**inputs).logits, expected) <= 1e-4


def test_training_ran_on_both_ranks(run):
    _, out_dir = run
    state = json.loads((out_dir / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    # each optimizer step consumed effective_batch_size examples: 8 per process on 2 processes
    assert state["epoch"] == pytest.approx(STEPS * EFFECTIVE_BATCH / TINY_ROWS)
    assert all(loss == loss for loss in logged_losses(out_dir).values()) and len(logged_losses(out_dir)) == STEPS
    checkpoint = out_dir / f"checkpoint-{SAVE_STEPS}"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()


def test_initial_adapter_is_the_float64_minor_components(run):
    check_initial_adapter(run[1], tiny_model("llama"))


def test_adapters_and_merged_reload_and_reproduce_the_trained_model(run):
    _, out_dir = run
    for name in ("adapter_model.safetensors", "residual_adapter/adapter_model.safetensors", "merged/config.json",
                 "milora_adapter.json", "README.md"):
        assert (out_dir / name).is_file(), name
    check_outputs_reproduce_training(out_dir, "llama", LLAMA_TARGETS, text_inputs())


@pytest.mark.parametrize("run", ["zero2", "zero3"], indirect=True)
def test_resume_continues_the_loss_curve(run, tmp_path):
    launcher, uninterrupted = run
    resumed = tmp_path / "out"
    resumed.mkdir()
    checkpoint = resumed / f"checkpoint-{SAVE_STEPS}"
    for name in (checkpoint.name, "milora_init_adapter"):
        shutil.copytree(uninterrupted / name, resumed / name)
    # mark the checkpoint's log: a run that ignored the checkpoint would log steps 1-2 afresh, unmarked
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    for entry in state["log_history"]:
        entry["from_checkpoint"] = True
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))

    train_tiny(launcher, resumed, "--resume_from_checkpoint", "true")
    log = json.loads((resumed / "trainer_state.json").read_text())["log_history"]
    assert {e["step"] for e in log if e.get("from_checkpoint")} == set(range(1, SAVE_STEPS + 1))
    continued = {e["step"]: e["loss"] for e in log if "loss" in e and not e.get("from_checkpoint")}
    assert sorted(continued) == list(range(SAVE_STEPS + 1, STEPS + 1))
    before = logged_losses(uninterrupted)
    for step, loss in continued.items():  # same weights, optimizer state, schedule and data order
        assert loss == pytest.approx(before[step], rel=1e-5), step


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("llava_zero3") / "out"
    # 4 examples per optimizer step over 2 processes: 2 per process
    launch("zero3", "recipes/tiny_llava_milora.yaml", out_dir, "--max_steps", "3", "--per_device_train_batch_size", "2")
    return out_dir


def test_llava_under_zero3_trains_the_projector_and_keeps_the_vision_tower(llava_run):
    from transformers import LlavaForConditionalGeneration

    original = tiny_model("llava")
    merged = LlavaForConditionalGeneration.from_pretrained(llava_run / "merged")
    before = dict(original.named_parameters())
    after = dict(merged.named_parameters())
    vision = [n for n in before if ".vision_tower." in n]
    projector = [n for n in before if ".multi_modal_projector." in n]
    assert vision and projector
    assert all(torch.equal(after[n], before[n]) for n in vision)
    assert all(not torch.equal(after[n], before[n]) for n in projector if n.endswith(".weight"))
    check_initial_adapter(llava_run, original)
    check_outputs_reproduce_training(llava_run, "llava", LLAVA_TARGETS, image_inputs())
