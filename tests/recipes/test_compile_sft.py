"""`recipes/sft.py` with `torch_compile: true`: the decoder layers are compiled in place (milora.regional_compile),
the Trainer does not compile the whole PEFT model, and the outputs are those of an eager run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
FAST = ["--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--per_device_train_batch_size", "4",
        "--effective_batch_size", "4", "--dataset_max_samples", "16", "--disable_tqdm", "true", "--report_to", "none",
        "--merge", "false"]


def test_torch_compile_compiles_the_decoder_layers_in_place(sft, tmp_path):
    torch._dynamo.reset()
    runs = {}
    compiled = ["--torch_compile", "true", "--torch_compile_backend", "aot_eager"]
    for name, extra in {"eager": [], "compiled": compiled}.items():
        out = tmp_path / name
        trainer = sft.train([str(RECIPES / "tiny_lora.yaml"), "--output_dir", str(out), *FAST, *extra])
        runs[name] = trainer, json.loads((out / "milora_run.json").read_text())
    trainer, _ = runs["compiled"]
    assert not trainer.args.torch_compile, "the Trainer itself compiles nothing"
    assert trainer.args.decoder_layer_compile["backend"] == "aot_eager"
    layers = trainer.model.get_base_model().model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert not isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert runs["eager"][0].args.decoder_layer_compile is None
    eager_loss, compiled_loss = (run[1]["final_loss"] for run in runs.values())
    assert abs(eager_loss - compiled_loss) <= 1e-4 * abs(eager_loss)


def test_torch_compile_with_an_fp8_base_trains_with_no_graph_break(sft, tmp_path):
    """The two opt-ins together: the FP8 layers inside the compiled decoder layers, no graph break counted."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    sft.train([str(RECIPES / "tiny_milora.yaml"), "--output_dir", str(tmp_path), *FAST, "--fp8_base", "true",
               "--torch_compile", "true", "--torch_compile_backend", "aot_eager"])
    info = json.loads((tmp_path / "milora_run.json").read_text())
    assert info["global_step"] == 2 and torch.isfinite(torch.tensor(info["final_loss"]))
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_cuda_graph_mode_marks_each_step_and_trains_as_the_eager_run(sft, tmp_path):
    """torch_compile_mode: reduce-overhead with the lengths bucketed (pad_to_multiple_of): the layers compiled in
    that mode, a step marker for their CUDA graphs, and the eager run's loss (the padding adds none)."""
    from milora.sft.model import CudaGraphStepMarker

    torch._dynamo.reset()
    losses = []
    for name, extra in {"eager": [], "graphs": ["--torch_compile", "true", "--torch_compile_backend", "aot_eager",
                                                 "--torch_compile_mode", "reduce-overhead"]}.items():
        trainer = sft.train([str(RECIPES / "tiny_lora.yaml"), "--output_dir", str(tmp_path / name), *FAST, *extra,
                             "--pad_to_multiple_of", "256"])
        markers = [c for c in trainer.callback_handler.callbacks if isinstance(c, CudaGraphStepMarker)]
        assert len(markers) == (name == "graphs")
        losses.append(json.loads((tmp_path / name / "milora_run.json").read_text())["final_loss"])
    assert abs(losses[0] - losses[1]) <= 1e-4 * abs(losses[0])
