"""Batched left-padded generation (text and LLaVA), the VQA pipeline pieces, and the result files."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from eval_harness import generation, llava_generation, results, vqa

PROMPTS = [
    "Below is an instruction. Tell me a long story about a dragon and a knight.",
    "Hi",
    "What is two plus two?",
]


@pytest.fixture(scope="module")
def tiny_causal(tiny_llama_dir):
    return generation.load_causal_lm(str(tiny_llama_dir), device="cpu")


def test_batched_left_padded_generation_matches_one_by_one(tiny_causal):
    model, tokenizer = tiny_causal
    config = generation.GenerationConfig(max_new_tokens=5, batch_size=3)
    batched = generation.generate(model, tokenizer, PROMPTS, config)
    single = [generation.generate(model, tokenizer, [p], config)[0] for p in PROMPTS]
    assert batched == single
    assert tokenizer.padding_side == "left"


def test_right_padding_is_refused(tiny_llama_dir):
    model, tokenizer = generation.load_causal_lm(str(tiny_llama_dir), device="cpu")
    tokenizer.padding_side = "right"
    with pytest.raises(ValueError):
        generation.generate(model, tokenizer, PROMPTS, generation.GenerationConfig(max_new_tokens=2, engine="hf"))


def _engine_and_hf(model, tokenizer, **settings) -> tuple[list[str], list[str]]:
    configs = [generation.GenerationConfig(engine=engine, batch_size=3, **settings) for engine in ("milora", "hf")]
    return tuple(generation.generate(model, tokenizer, PROMPTS, config) for config in configs)


def test_engine_gives_the_hf_paths_text_and_stops_at_stop_strings(tiny_causal):
    model, tokenizer = tiny_causal
    on_engine, on_hf = _engine_and_hf(model, tokenizer, max_new_tokens=40)
    assert on_engine == on_hf
    # a stop string taken from the middle of one answer: that answer is cut there, on both paths alike
    stop = on_hf[0][10:12]
    engine = generation._ENGINES[model]
    made_before = engine.stats["tokens"]
    cut_engine, cut_hf = _engine_and_hf(model, tokenizer, max_new_tokens=40, stop=(stop,))
    assert cut_engine == cut_hf and len(cut_hf[0]) <= 10
    assert engine.stats["tokens"] - made_before < made_before  # the engine ended that sequence early
    beams_engine, beams_hf = _engine_and_hf(model, tokenizer, max_new_tokens=12, num_beams=3)
    assert beams_engine == beams_hf and beams_hf != on_hf


def test_models_the_engine_cannot_follow_go_to_model_generate(tiny_llama_dir, caplog):
    model, tokenizer = generation.load_causal_lm(str(tiny_llama_dir), device="cpu")
    model.generation_config.repetition_penalty = 1.5  # a logits processor the engine does not implement
    with caplog.at_level("WARNING"):
        on_engine, on_hf = _engine_and_hf(model, tokenizer, max_new_tokens=20)
    assert on_engine == on_hf
    assert "repetition_penalty" in caplog.text and model not in generation._ENGINES
    with pytest.raises(ValueError, match="engine='vllm'"):
        generation.generate(model, tokenizer, PROMPTS, generation.GenerationConfig(engine="vllm"))


def test_truncate_at_stop_and_prompt_formats(tiny_causal):
    _, tokenizer = tiny_causal
    assert generation.truncate_at_stop("answer\n### Instruction: more", ["### Instruction:", "zzz"]) == "answer\n"
    assert generation.truncate_at_stop("answer", []) == "answer"
    assert generation.format_prompt("Do X.", tokenizer, "alpaca").endswith("### Instruction:\nDo X.\n\n### Response:\n")
    assert generation.format_prompt("Do X.", tokenizer, "chat").endswith("### Assistant:\n")
    assert generation.format_prompt("Do X.", tokenizer, "raw") == "Do X."


# --------------------------------------------------------------------------- LLaVA


@pytest.fixture(scope="module")
def tiny_llava(tiny_llava_dir):
    return llava_generation.load_llava(str(tiny_llava_dir), device="cpu")


def _image(color, size=(40, 30)):
    return Image.new("RGB", size, color)


def test_llava_batched_answers_match_one_by_one(tiny_llava):
    model, processor = tiny_llava
    questions = [
        llava_generation.VisualQuestion(_image((255, 0, 0)), "What color is the picture?"),
        llava_generation.VisualQuestion(_image((0, 0, 255), (64, 64)), "Is there a dog?"),
        llava_generation.VisualQuestion(None, "A text-only question about physics, with no image at all?"),
    ]
    batched = llava_generation.answer_questions(model, processor, questions, batch_size=3, max_new_tokens=4)
    single = [llava_generation.answer_questions(model, processor, [q], max_new_tokens=4)[0] for q in questions]
    assert batched == single
    assert len(batched) == 3


def test_llava_prompt_styles(tiny_llava):
    _, processor = tiny_llava
    v1 = llava_generation.llava_prompt(processor, "What is it?", "llava_v1")
    assert v1.endswith("USER: <image>\nWhat is it? ASSISTANT:")
    chat = llava_generation.llava_prompt(processor, "What is it?", "chat")
    assert "<image>" in chat and "What is it?" in chat


def test_vqa_requests_expand_mmbench_circularly(tmp_path):
    record = {
        "question_id": 7,
        "image": "img.png",
        "question": "Which animal?",
        "options": {"A": "cat", "B": "dog", "C": "owl"},
        "answer": "B",
        "hint": "A farm.",
    }
    pairs = vqa.build_requests("mmbench", [record], image_dir=tmp_path)
    assert len(pairs) == 3
    first_record, first_question = pairs[0]
    assert first_question.question == "A farm.\nWhich animal?\nA. cat\nB. dog\nC. owl\n" + vqa.LETTER_ANSWER
    assert first_question.image == tmp_path / "img.png"
    assert [r["answer"] for r, _ in pairs] == ["B", "A", "C"]
    assert vqa.question_text("vizwiz", {"question": "What is it?"}).endswith(
        "respond with 'Unanswerable'.\nAnswer the question using a single word or phrase."
    )
    assert vqa.question_text("scienceqa", {"question": "Q?", "choices": ["x", "y"], "hint": "h"}).startswith(
        "Context: h\nQ?\nA. x"
    )


# --------------------------------------------------------------------------- result files


def test_atomic_report_files(tmp_path):
    report = {
        "suite": "math",
        "model": "m",
        "metrics": {"milora_gsm8k": {"exact_match": 0.25, "n": 4, "odd": float("nan")}},
        "skipped": {"milora_math": "offline"},
    }
    json_path, md_path = results.write_report(tmp_path, report)
    data = json.loads(json_path.read_text())
    assert data["metrics"]["milora_gsm8k"] == {"exact_match": 0.25, "n": 4, "odd": None}
    markdown = md_path.read_text()
    assert "| milora_gsm8k | exact_match | 0.2500 |" in markdown
    assert "- milora_math: offline" in markdown
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]  # no temp files left


def test_failed_write_leaves_the_old_file(tmp_path):
    from milora.io import atomic_write_text  # the writer behind every result file

    json_path, _ = results.write_report(tmp_path, {"suite": "s", "model": "m", "metrics": {"t": {"v": 1}}})
    with pytest.raises(TypeError):
        atomic_write_text(json_path, None)  # not text: the write fails
    assert json.loads(json_path.read_text())["metrics"] == {"t": {"v": 1}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]


def test_samples_are_one_jsonl_file_per_task(tmp_path):
    import numpy as np

    results.write_samples(tmp_path, {"gsm8k": [{"acc": np.float64(0.5), "x": math.nan}], "a/b": []})
    assert (tmp_path / "samples" / "gsm8k.jsonl").read_text() == '{"acc": 0.5, "x": null}\n'
    assert (tmp_path / "samples" / "a_b.jsonl").read_text() == ""


def test_to_jsonable_handles_numpy_and_infinities():
    import numpy as np

    assert results.to_jsonable({"a": np.float64(0.5), "b": (1, 2), "c": math.inf}) == {"a": 0.5, "b": [1, 2], "c": None}


def test_vqa_score_dispatch_per_benchmark():
    vqav2 = [{"answers": [{"answer": "2"}] * 3 + [{"answer": "two dogs"}] * 7}]
    assert vqa.score("vqav2", vqav2, ["Two"]) == {"accuracy": pytest.approx(0.9)}
    assert vqa.score("textvqa", [{"answers": ["stop"] * 10}], ["STOP."]) == {"accuracy": 1.0}
    assert vqa.score("gqa", [{"answer": "left"}, {"answer": "no"}], ["Left.", "yes"]) == {"accuracy": 0.5}
    science = [{"choices": ["a", "b", "c"], "answer": 2, "image": "x.png"}, {"choices": ["a", "b"], "answer": 0}]
    assert vqa.score("scienceqa", science, ["C", "B"]) == {"accuracy": 0.5, "img_accuracy": 1.0}
    record = {"question_id": 1, "question": "Q", "options": ["cat", "dog"], "answer": "B", "category": "c"}
    pairs = vqa.build_requests("mmbench", [record])
    right = ["B", "A"]  # the gold letter of each circular pass
    assert vqa.score("mmbench", [r for r, _ in pairs], right)["circular_accuracy"] == 1.0
    assert vqa.score("mmbench", [r for r, _ in pairs], ["B", "B"])["circular_accuracy"] == 0.0
    with pytest.raises(ValueError):
        vqa.score("okvqa", [], [])


def test_open_ended_answers_are_stored_as_made_and_a_rerun_generates_only_the_missing(tiny_llama_dir, tmp_path,
                                                                                      caplog):
    from eval_harness.cli import build_parser
    from eval_harness.suites.open_ended import generate_for_instructions
    from milora.model_source import model_source

    args = build_parser().parse_args(["--suite", "alpaca_eval", "--model", str(tiny_llama_dir), "--device", "cpu",
                                      "--max_gen_toks", "12"])  # fmt: skip
    args.model_source = model_source(args.model)
    first = generate_for_instructions(args, PROMPTS, "answers", tmp_path, "alpaca_eval")
    stored = tmp_path / "samples" / "alpaca_eval.generations.jsonl"
    lines = stored.read_text().splitlines()
    assert len(lines) == len(PROMPTS)
    stored.write_text(lines[0] + "\n")  # a run stopped after its first answer
    with caplog.at_level("INFO"):
        again = generate_for_instructions(args, PROMPTS, "answers", tmp_path, "alpaca_eval")
    assert again == first and "reusing 1 stored answers" in caplog.text
    assert len(stored.read_text().splitlines()) == len(PROMPTS)
    args.max_gen_toks = 6  # other settings: generated afresh, not taken from the store
    shorter = generate_for_instructions(args, PROMPTS, "answers", tmp_path, "alpaca_eval")
    assert len(stored.read_text().splitlines()) == 2 * len(PROMPTS)
    assert all(len(s) <= len(f) for s, f in zip(shorter, first, strict=True)) and shorter != first
