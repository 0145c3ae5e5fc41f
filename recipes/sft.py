"""Finetune a causal LM with LoRA, PiSSA or MiLoRA through TRL's `SFTTrainer` (as
`milora.sft.trainer.SFTTrainer`: the same, with no host synchronisation inside a step), from one YAML recipe.

    python recipes/sft.py recipes/tiny_milora.yaml                       # offline, CPU, about a minute
    accelerate launch recipes/sft.py recipes/llama2-7b_math_milora.yaml  # any recipe key can follow as --key value
    accelerate launch --config_file deepspeed_configs/accelerate_zero2.yaml recipes/sft.py RECIPE.yaml

Outputs in `output_dir` (every adapter folder names its base and holds `milora_adapter.json`, the base's
fingerprint, which `milora merge` and `milora convert` check):
    adapter_model.safetensors, adapter_config.json, tokenizer   the adapter for the ORIGINAL base model: for
                           pissa/milora/mid/random the rank-2r standard LoRA, for lora the trained adapter
    README.md              the model card: what was trained, which folder loads on which base, with code
    residual_adapter/      the adapter as trained (rank r), for the residual base W - B0 A0 (SVD methods)
    milora_init_adapter/   the adapter as initialised, before training (SVD methods)
    residual_base/         the residual base model (`save_residual_base: true`)
    merged/                the merged full checkpoint with its tokenizer, for lm_eval (`merge: true`)
    checkpoint-N/, runs/   Trainer checkpoints (`resume_from_checkpoint: true`) and TensorBoard logs
    milora_run.json        what was trained, the step-0 check, where each output is; written last

Keys and their defaults: `milora/sft/config.py`; each step below is one module of `milora/sft/`.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import milora  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from milora import MiLoRAError
from milora.data import DataError
from milora.io import DamagedFileError
from milora.processes import end_processes, exit_process
from milora.sft.checkpoints import TrainingAlreadyDone, stop_at_max_steps_callback
from milora.sft.config import RecipeError
from milora.sft.data import load_training_data
from milora.sft.model import build_peft_model, compile_decoder_layers, load_tokenizer
from milora.sft.outputs import prepare_initial_adapter, save_outputs
from milora.sft.parsing import parse_recipe
from milora.sft.step0 import run_step0_check


def train(argv: list[str] | None = None):
    """Parse, data, model, trainer, train, save; returns the finished `SFTTrainer`."""
    from milora.sft.trainer import SFTTrainer

    recipe = parse_recipe(argv)
    model_args, training_args = recipe.model, recipe.training

    # Data before the model: a bad dataset fails in seconds, before a 7B model loads or an SVD runs.
    tokenizer = load_tokenizer(model_args)
    with training_args.main_process_first(desc="loading the dataset"):
        data = load_training_data(recipe, tokenizer)
    # The data decides a few trainer settings (loss masking; LLaVA's own collator needs its rows untouched).
    for key, value in data.trainer_overrides.items():
        setattr(training_args, key, value)

    model, original_fingerprint = build_peft_model(model_args, training_args)
    prepare_initial_adapter(model, model_args, training_args)

    trainer = SFTTrainer(
        model=model, args=training_args, train_dataset=data.train_dataset, eval_dataset=data.eval_dataset,
        processing_class=tokenizer, data_collator=data.data_collator,
    )
    if model_args.load_in_4bit:  # SFTTrainer casts the adapters of 4-bit models to bf16; keep the factors exact
        from milora.quantization import adapters_to_float32

        adapters_to_float32(trainer.model)
    # The initialised model must still be the base model: one forward pass of the first batch through both.
    step0 = run_step0_check(trainer, model_args, training_args).as_dict() if training_args.step0_check else None
    compile_decoder_layers(trainer, training_args)  # torch_compile: the layers, after the eager step-0 check
    trainer.add_callback(stop_at_max_steps_callback())
    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except TrainingAlreadyDone as done:  # resumed from the last step: only the outputs were missing
        trainer.accelerator.print(f"sft.py: {done}; writing the outputs")
    save_outputs(trainer, recipe, original_fingerprint, step0)
    trainer.accelerator.print(f"sft.py: done, outputs in {training_args.output_dir}")
    end_processes()  # every rank done (a barrier), then no process group left for `trainer.end` to destroy
    if hasattr(trainer, "end"):  # transformers >= 5.18: close the trackers
        trainer.end()
    return trainer


def main(argv: list[str] | None = None) -> int:
    try:
        train(argv)
    except (RecipeError, DataError, MiLoRAError, DamagedFileError) as error:  # bad input: one line, no traceback
        print(f"sft.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    exit_process(main())
