"""The model card (`README.md`) a training run writes at the root of its output directory, and the evaluation
tables `milora eval` appends to it.

The card has Hub metadata (`base_model`, `library_name: peft`, tags with the method), what was trained and how
(method, r, alpha, targets, data, steps, final loss, the step-0 check), which folder to load on which base with
code for PEFT, transformers and a LoRA-serving engine, why the converted adapter has rank 2r, and, for a run on a
4-bit base, how far its standard LoRA on the full-precision base is from the trained model.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from milora.io import atomic_write_text, read_json
from milora.layout import (
    INIT_ADAPTER_DIR,
    MERGED_DIR,
    MODEL_CARD_FILE,
    RESIDUAL_ADAPTER_DIR,
    RESIDUAL_BASE_DIR,
    RUN_INFO_FILE,
)

EVALUATION_HEADING = "## Evaluation"
METHOD_TEXT = {
    "milora": "the adapter starts from the r minor singular components of each adapted weight",
    "pissa": "the adapter starts from the r principal singular components of each adapted weight",
    "mid": "the adapter starts from r singular components from the middle of the spectrum (ablation)",
    "random": "the adapter starts from r randomly chosen singular components (ablation)",
    "lora": "plain LoRA, the adapter starts at zero (B = 0)",
}


def _front_matter(info: dict) -> str:
    tags = ["peft", "lora", "milora", "trl", "sft"]
    if info["method"] not in tags:
        tags.insert(0, info["method"])
    lines = ["---"]
    if info.get("base_model"):
        lines.append(f"base_model: {info['base_model']}")
    lines += ["library_name: peft", "pipeline_tag: text-generation", "tags:", *[f"- {tag}" for tag in tags], "---"]
    return "\n".join(lines) + "\n"


def _step0_text(step0: dict | None) -> str:
    if not step0:
        return "not run"
    if step0.get("skipped"):
        return f"skipped ({step0['skipped']})"
    return (f"relative logit error {step0['logit_relative_error']:.2e} (limit {step0['threshold']:.0e}, "
            f"{step0['dtype']}), loss difference {step0['loss_difference']:+.2e} on the first batch "
            f"({step0['rows']} rows)")


def _loss_text(loss) -> str:
    return "n/a" if loss is None else f"{loss:.4f}"


def _training_table(info: dict) -> str:
    targets = info["lora_target_modules"]
    targets = ", ".join(targets) if isinstance(targets, list) else str(targets)
    rows = [
        ("method", f"`{info['method']}`: {METHOD_TEXT.get(info['method'], '')}"),
        ("base model", f"`{info.get('base_model')}`"),
        ("rank r / lora_alpha", f"{info['lora_r']} / {info['lora_alpha']}"),
        ("target modules", targets),
        ("data", f"`{info.get('dataset')}`"),
        ("optimizer steps", str(info.get("global_step"))),
        ("final training loss", _loss_text(info.get("final_loss"))),
        ("step-0 check", _step0_text(info.get("step0_check"))),
    ]
    if info.get("milora_init_dir"):
        rows.insert(2, ("init directory", f"`{info['milora_init_dir']}`"))
    return "| | |\n| --- | --- |\n" + "".join(f"| {key} | {value} |\n" for key, value in rows)


def _folders_table(info: dict, svd: bool) -> str:
    base = info.get("base_model")
    rank = 2 * info["lora_r"] if svd else info["lora_r"]
    rows = [(".", f"the original model `{base}`", f"standard LoRA, rank {rank}: ship this one")]
    if svd:
        residual = (f"the residual base in `{info['residual_base']}`" if info.get("residual_base")
                    else f"the init directory `{info['milora_init_dir']}`" if info.get("milora_init_dir")
                    else "the residual base `W - B0 A0` (not saved; `save_residual_base: true` keeps it)")
        rows += [
            (f"{RESIDUAL_ADAPTER_DIR}/", residual, f"the adapter as trained (rank {info['lora_r']})"),
            (f"{INIT_ADAPTER_DIR}/", residual, "the adapter as initialised (for the conversion)"),
        ]
        if info.get("residual_base"):
            rows.append((f"{RESIDUAL_BASE_DIR}/", "-", "the residual base model itself"))
    if info.get("merged"):
        rows.append((f"{MERGED_DIR}/", "- (a full model)", "lm-eval, vLLM, `from_pretrained`"))
    return ("| folder | loads on | what it is |\n| --- | --- | --- |\n"
            + "".join(f"| `{folder}` | {where} | {what} |\n" for folder, where, what in rows))


def _usage(info: dict, name: str, svd: bool) -> str:
    base = info.get("base_model")
    rank = 2 * info["lora_r"] if svd else info["lora_r"]
    text = f"""PEFT, on the original model:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{name}")   # or AutoPeftModelForCausalLM.from_pretrained("{name}")
```
"""
    if info.get("merged"):
        text += f"""
transformers, the merged checkpoint (no PEFT needed):

```python
model = AutoModelForCausalLM.from_pretrained("{name}/{MERGED_DIR}")
```
"""
    text += f"""
A LoRA-serving engine (vLLM), the adapter on the original model (`max_lora_rank` at least {rank}):

```python
from vllm import LLM
from vllm.lora.request import LoRARequest

llm = LLM(model="{base}", enable_lora=True, max_lora_rank={max(rank, 8)})
outputs = llm.generate(["..."], lora_request=LoRARequest("{info['method']}", 1, "{name}"))
```

`milora merge --base {base} --adapter {name} --out merged` writes the merged checkpoint; it and
`milora convert` check the base's weights against the fingerprint in `milora_adapter.json` first.
"""
    return text


WHY_2R = """### Why the adapter here has rank 2r

The run trained `B A` (rank r) on the residual base `W - s B0 A0`, where `B0 A0` is the adapter as initialised.
On the original weights `W` the same model is `W + s (B A - B0 A0)`, and `B A - B0 A0 = [B, B0] [A; -A0]`: a LoRA
of rank 2r with the same scaling (lora_alpha doubled). It applies to the unchanged original model, which is why
it is the adapter to share; the rank-r adapter in `residual_adapter/` is only right on the residual base.
"""


FOUR_BIT_HEADING = "## Trained on a 4-bit base"


def _four_bit_text(info: dict) -> str:
    """What the standard LoRA of a run on a 4-bit base carries of the base's quantization error, as measured
    (`milora.sft.quantized.note_standard_lora_difference`)."""
    settings, difference = info["quantization"], info["standard_lora_difference"]
    return (
        f"{FOUR_BIT_HEADING}\n\n"
        f"This adapter was trained on a 4-bit ({settings['quant_type']}, nested: {settings['nested']}) base and is "
        f"written for the full-precision `{info.get('base_model')}`. There it carries the quantization error of the "
        f"frozen base, which training does not remove. Measured on {difference['tokens']} tokens of the training "
        "data against the trained 4-bit model:\n\n"
        f"- relative logits difference ||z - z_4bit|| / ||z||: {difference['relative_logits_difference']:.4f}\n"
        f"- largest |log p - log p_4bit|: {difference['max_abs_logprob_difference']:.4f}\n"
        f"- same most likely next token: {100 * difference['top1_agreement']:.1f}% of positions\n\n"
        "To reproduce the trained model exactly, load the base in 4 bits with the same settings "
        "(the residual base for milora/pissa: `merged/` holds the dequantized result).\n"
    )


FP8_HEADING = "## Trained on an FP8 base"


def _fp8_text(info: dict) -> str:
    """A run with `fp8_base`: what ran in FP8, and that the adapter is for the base in its own dtype."""
    step0 = info.get("step0_check") or {}
    error = step0.get("fp8_logit_relative_error")
    measured = (f" At the first step the FP8 model's logits differed from the base model's by {error:.4f} "
                "(relative, ||z - z_fp8|| / ||z||)." if error is not None else "")
    return (
        f"{FP8_HEADING}\n\n"
        "The frozen base's linear layers multiplied in float8 during training (`fp8_base`: e4m3 operands, one scale "
        "per token and per weight row); the weights themselves, the adapter and its gradients kept their dtypes. "
        f"The adapter and `merged/` are for the base in its own dtype, like any other.{measured}\n"
    )


def model_card(info: dict, name: str) -> str:
    """The card's Markdown for a run summary `info` (`milora.sft.outputs.save_outputs`) of the folder `name`."""
    svd = info["method"] != "lora"
    base = info.get("base_model")
    text = _front_matter(info)
    text += f"\n# {Path(name).name}\n\nA {info['method']} adapter for `{base}`, trained with "
    text += "[milora](https://arxiv.org/abs/2406.09044) (TRL's SFTTrainer, PEFT).\n\n"
    text += "## Training\n\n" + _training_table(info)
    text += "\n## Which folder to load on which base\n\n" + _folders_table(info, svd) + "\n" + _usage(info, name, svd)
    if svd:
        text += "\n" + WHY_2R
    if info.get("standard_lora_difference"):
        text += "\n" + _four_bit_text(info)
    if info.get("fp8_base"):
        text += "\n" + _fp8_text(info)
    return text


def residual_folder_card(info: dict, folder: str) -> str:
    """The short card of `residual_adapter/` and `milora_init_adapter/`: not the adapter to ship."""
    where = info.get("residual_base") or info.get("milora_init_dir")
    base = f"the residual base model in `{where}`" if where else "the residual base `W - B0 A0`, which was not saved"
    what = "as trained" if folder == RESIDUAL_ADAPTER_DIR else "as initialised"
    return (f"# {folder}\n\nThe {info['method']} adapter {what} (rank {info['lora_r']}). It applies to {base}, "
            f"not to the original model `{info.get('base_model')}`: on the original model load the standard LoRA "
            "in the folder above (see its README). `milora merge` checks the base against `milora_adapter.json`.\n")


def write_model_card(out_dir: str | Path, info: dict) -> Path:
    """Write `README.md` in a run's output directory (and the short cards of its residual-base folders), keeping
    the evaluation sections of an earlier card."""
    out_dir = Path(out_dir)
    path = out_dir / MODEL_CARD_FILE
    evaluations = ""
    if path.is_file():
        old = path.read_text(encoding="utf-8")
        if EVALUATION_HEADING in old:
            evaluations = old[old.index(EVALUATION_HEADING):]
    for folder in (RESIDUAL_ADAPTER_DIR, INIT_ADAPTER_DIR):
        if (out_dir / folder).is_dir():
            atomic_write_text(out_dir / folder / MODEL_CARD_FILE, residual_folder_card(info, folder))
    text = model_card(info, info.get("adapter") or str(out_dir))
    return atomic_write_text(path, text + ("\n" + evaluations if evaluations else ""))


def run_directory_of(model_path: str | Path) -> Path | None:
    """The training run whose card describes `model_path`: the folder itself or, for `RUN/merged`, `RUN`; None
    for any other model folder (it is left untouched)."""
    path = Path(model_path)
    for candidate in (path, path.parent if path.name == MERGED_DIR else None):
        if candidate is not None and (candidate / RUN_INFO_FILE).is_file() and (candidate / MODEL_CARD_FILE).is_file():
            return candidate
    return None


def append_evaluation(model_path: str | Path, suite: str, table: str) -> Path | None:
    """Append `milora eval`'s table for `suite` to the model card of the run `model_path` belongs to.
    Returns the card's path, or None when `model_path` is not a milora run's output (nothing is written)."""
    run_dir = run_directory_of(model_path)
    if run_dir is None:
        return None
    try:
        read_json(run_dir / RUN_INFO_FILE)
    except ValueError:
        return None  # a run summary being rewritten: leave the card alone
    path = run_dir / MODEL_CARD_FILE
    text = path.read_text(encoding="utf-8").rstrip("\n") + "\n"
    if EVALUATION_HEADING not in text:
        text += f"\n{EVALUATION_HEADING}\n"
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    evaluated = Path(model_path).name if Path(model_path) != run_dir else "."
    text += f"\n### {suite} (`milora eval`, {date}, model `{evaluated}`)\n\n{table.rstrip()}\n"
    return atomic_write_text(path, text)
