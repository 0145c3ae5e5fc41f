"""`milora eval --engine milora` (lm-eval's HFLM with milora's generation engine) against `--engine hf`.

The checkpoints are the tiny llama and qwen2 with their weights scaled up, so that greedy answers differ from
prompt to prompt, some end with EOS and some run into the stop strings; the engine's calls are recorded, so a
test knows which requests it answered. On CPU in float32 every greedy answer must be the HF path's, to the byte,
and so must every beam-search answer (against HFLM with batch size 1: in larger batches lm-eval's stop criterion
ties the prompts of a batch together).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval_harness import lm_eval_runner
from eval_harness.engine import BeamSearchEngine, GenerationEngine
from eval_harness.local_tasks import project_task_yaml, write_local_task_yaml
from milora.cli import main as milora_main
from milora.io import read_jsonl, write_jsonl
from milora.tiny import tiny_tokenizer
from tests.eval_harness.varied_checkpoints import QUESTIONS, run_eval, save_varied_checkpoint

STOPS = ["9", "K", ";", "j", "z"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def varied_dir(request, tmp_path_factory) -> Path:
    return save_varied_checkpoint(request.param, tmp_path_factory.mktemp(f"varied_{request.param}"))


@pytest.fixture(scope="module")
def stop_task_dir(tmp_path_factory) -> Path:
    """A generation task whose stop strings are characters the tiny models write."""
    folder = tmp_path_factory.mktemp("stop_task")
    rows = write_jsonl(folder / "rows.jsonl", [{"question": q, "answer": "5"} for q in QUESTIONS])
    (folder / "stop_chars.yaml").write_text(
        f"task: stop_chars\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {rows}\n"
        'test_split: test\noutput_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        f"generation_kwargs:\n  until: {json.dumps(STOPS)}\n  max_gen_toks: 40\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return folder


@pytest.fixture(scope="module")
def gsm8k_rows(tmp_path_factory) -> Path:
    """GSM8K-format rows (question, worked answer ending in ``#### <number>``)."""
    rows = [{"question": q, "answer": f"Add them.\n#### {n}"} for n, q in enumerate(QUESTIONS)]
    return write_jsonl(tmp_path_factory.mktemp("gsm8k") / "gsm8k.jsonl", rows)


def record_calls(monkeypatch, owner: type, name: str) -> list[tuple[list, list]]:
    """(prompts, new tokens) of every call of the engine method `owner.name`, which still runs."""
    calls: list[tuple[list, list]] = []
    original = getattr(owner, name)

    def recording(self, prompts, *args, **kwargs):
        outputs = original(self, prompts, *args, **kwargs)
        calls.append(([list(p) for p in prompts], outputs))
        return outputs

    monkeypatch.setattr(owner, name, recording)
    return calls


@pytest.fixture
def engine_calls(monkeypatch) -> list[tuple[list, list]]:
    """(prompts, new tokens) of every greedy call of the engine."""
    return record_calls(monkeypatch, GenerationEngine, "generate")


@pytest.fixture
def beam_calls(monkeypatch) -> list[tuple[list, list]]:
    """(prompts, new tokens) of every beam-search call of the engine."""
    return record_calls(monkeypatch, BeamSearchEngine, "beam_search")


def run_both(model: Path, tasks: list[str], manager, **options) -> dict[str, tuple[dict, dict]]:
    """engine -> (metrics, {task: sample rows}) of `lm_eval_runner.run_tasks` on the milora and hf engines."""
    outcome = {}
    for engine in ("milora", "hf"):
        lm = lm_eval_runner.build_lm(str(model), device="cpu", batch_size=4, max_length=320, engine=engine)
        run = lm_eval_runner.run_tasks(lm, tasks, manager, keep_going=False, **options)
        outcome[engine] = run.metrics, run.samples
    return outcome


def test_milora_eval_gives_the_hf_path_s_samples_and_scores(
    varied_dir, tmp_path, gsm8k_rows, fixtures_dir, engine_calls
):
    """GSM8K, and the commonsense sets made greedy (--num_beams 1): the same samples and scores."""
    gsm8k = ["--suite", "gsm8k", "--gsm8k_file", str(gsm8k_rows), "--max_gen_toks", "40"]
    commonsense = ["--suite", "commonsense", "--commonsense_dir", str(fixtures_dir / "commonsense"), "--limit", "1",
                   "--num_beams", "1", "--max_length", "320"]  # fmt: skip
    for name, args in (("gsm8k", gsm8k), ("commonsense", commonsense)):
        engine_run = run_eval(varied_dir, tmp_path / name / "milora", "milora", *args)
        calls = len(engine_calls)
        assert calls > 0
        assert run_eval(varied_dir, tmp_path / name / "hf", "hf", *args) == engine_run
        assert len(engine_calls) == calls  # --engine hf never reaches the engine
    assert (
        sum(len(prompts) for prompts, _ in engine_calls) == len(QUESTIONS) + 8
    )  # every request once (8 sets, 1 item each)


def test_stop_strings_and_eos_end_answers_as_in_hf(varied_dir, stop_task_dir, engine_calls):
    outcome = run_both(varied_dir, ["stop_chars"], lm_eval_runner.task_manager([stop_task_dir]))
    assert outcome["milora"] == outcome["hf"]
    # Not vacuous: some answers ended with EOS, some were cut at a stop string the engine generated past.
    tokenizer = tiny_tokenizer()
    raw = {
        tokenizer.decode(prompt, skip_special_tokens=True): (tokens, tokenizer.decode(tokens, skip_special_tokens=True))
        for prompts, outputs in engine_calls
        for prompt, tokens in zip(prompts, outputs, strict=True)
    }
    answers = {row["prompt"]: row["response"][0] for row in outcome["milora"][1]["stop_chars"]}
    assert set(answers) == set(raw)
    assert any(raw[p][1] != answer and any(s in raw[p][1] for s in STOPS) for p, answer in answers.items())
    assert len(set(answers.values())) > 1
    stopped_early = [t for t, _ in raw.values() if len(t) < 40 and tokenizer.eos_token_id not in t]
    assert stopped_early  # by the stop-string check, not by EOS or the token limit
    if "qwen2" in varied_dir.name:  # the llama meets a stop string first every time
        assert any(tokenizer.eos_token_id in tokens for tokens, _ in raw.values())


@pytest.mark.parametrize(("kind", "eos_boost"), [("llama", -0.1), ("qwen2", 1.0)])
def test_beam_search_requests_go_to_the_engine_and_equal_hf(
    kind, eos_boost, tmp_path, fixtures_dir, engine_calls, beam_calls
):
    """The commonsense suite with its own 4 beams (stop string: the EOS text): the engine answers every request,
    with the samples and scores of HFLM's path in batches of one. (EOS boosts other than `varied_dir`'s: with
    these, some beam-search answers end with EOS and some run to the 32-token limit.)"""
    varied_dir = save_varied_checkpoint(kind, tmp_path / "model", eos_boost=eos_boost)
    args = ["--suite", "commonsense", "--commonsense_dir", str(fixtures_dir / "commonsense"), "--max_length", "320"]
    engine_run = run_eval(varied_dir, tmp_path / "milora", "milora", *args)
    assert engine_calls == [] and sum(len(prompts) for prompts, _ in beam_calls) == 17  # every item of 8 sets
    calls = len(beam_calls)
    assert run_eval(varied_dir, tmp_path / "hf", "hf", *args, "--batch_size", "1") == engine_run
    assert len(beam_calls) == calls  # --engine hf never reaches the engine
    # Not vacuous: answers ended by EOS and answers that ran to the limit.
    answers = [tokens for _, outputs in beam_calls for tokens in outputs]
    assert any(tokens[-1] == tiny_tokenizer().eos_token_id for tokens in answers)
    assert any(len(tokens) == 32 for tokens in answers)


def test_vllm_engine_without_the_package_is_a_one_line_error(tiny_llama_dir, tmp_path, capsys):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    out = str(tmp_path / "out")
    status = milora_main(["eval", "--suite", "gsm8k", "--model", str(tiny_llama_dir), "--output_dir", out,
                          "--engine", "vllm", "--device", "cpu", "--gsm8k_file", "hub"])  # fmt: skip
    assert status == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line == "milora eval: error: --engine vllm needs the vllm package, which is not installed; pip install vllm"


@pytest.mark.end_to_end
def test_lm_eval_command_line_runs_the_milora_model(tmp_path, fixtures_dir):
    """`python -m eval_harness.lm_eval_cli run --model milora ...` from a foreign folder: lm-eval's own command
    line, the model registered; its answers are HFLM's."""
    model = save_varied_checkpoint("llama", tmp_path / "model")
    variant_dir = tmp_path / "tasks"
    write_local_task_yaml(project_task_yaml("milora_math"), fixtures_dir / "math_test.jsonl", variant_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "eval_harness.lm_eval_cli", "run", "--model", "milora", "--model_args",
               f"pretrained={model},max_length=256,max_slots=2", "--tasks", "milora_math",
               "--include_path", str(variant_dir), "--device", "cpu", "--limit", "3", "--gen_kwargs",
               "max_gen_toks=24", "--output_path", str(tmp_path / "out"), "--log_samples"]  # fmt: skip
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (samples_file,) = (tmp_path / "out").rglob("samples_milora_math_*.jsonl")
    answers = [sample["filtered_resps"][0] for sample in sorted(read_jsonl(samples_file), key=lambda s: s["doc_id"])]
    manager = lm_eval_runner.task_manager([variant_dir])
    hf = lm_eval_runner.build_lm(str(model), device="cpu", batch_size=3, max_length=256, engine="hf")
    run = lm_eval_runner.run_tasks(hf, ["milora_math"], manager, limit=3, gen_kwargs={"max_gen_toks": 24})
    assert answers == [row["response"][0] for row in sorted(run.samples["milora_math"], key=lambda r: r["doc_id"])]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(results_file.read_text())["config"]["model"] == "milora"


def test_an_interrupted_run_resumes_without_regenerating(tmp_path, gsm8k_rows, engine_calls, monkeypatch):
    """Stopped inside the engine after 2 of 5 answers (each stored as it finishes), a rerun generates only the
    other 3 and reports what an uninterrupted run reports; changed weights generate everything again."""
    model = save_varied_checkpoint("qwen2", tmp_path / "model")
    args = ["--suite", "gsm8k", "--gsm8k_file", str(gsm8k_rows), "--max_gen_toks", "40"]
    out = tmp_path / "interrupted"
    recording = GenerationEngine.generate

    def interrupt_after_two_answers(self, prompts, *rest, on_finish=None, **kwargs):
        finished = []

        def finish(request, tokens):
            on_finish(request, tokens)
            finished.append(request)
            if len(finished) == 2:
                raise KeyboardInterrupt

        return recording(self, prompts, *rest, on_finish=finish, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(GenerationEngine, "generate", interrupt_after_two_answers)
        with pytest.raises(KeyboardInterrupt):
            run_eval(model, out, "milora", *args)
    stored = read_jsonl(out / "samples" / "milora_gsm8k.generations.jsonl")
    assert len(stored) == 2 and not (out / "results.json").exists() and engine_calls == []
    resumed = run_eval(model, out, "milora", *args)
    assert [len(prompts) for prompts, _ in engine_calls] == [3]  # only what the stop left undone
    assert len(read_jsonl(out / "samples" / "milora_gsm8k.generations.jsonl")) == len(QUESTIONS)
    assert run_eval(model, tmp_path / "whole", "milora", *args) == resumed
    assert [len(prompts) for prompts, _ in engine_calls] == [3, len(QUESTIONS)]
    assert run_eval(model, out, "milora", *args) == resumed  # a finished run reruns from its samples alone
    assert len(engine_calls) == 2
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert run_eval(model, out, "milora", *args) == resumed
    assert sum(len(prompts) for prompts, _ in engine_calls[2:]) == len(QUESTIONS)  # a retrained model: afresh


def test_a_model_the_engine_cannot_drive_falls_back_to_hf_with_one_warning(
    varied_dir, stop_task_dir, engine_calls, monkeypatch, caplog
):
    from eval_harness import lm_eval_model
    from eval_harness.engine import runner

    monkeypatch.setattr(runner, "supports", lambda model: False)
    with caplog.at_level("WARNING", logger=lm_eval_model.__name__):
        lm = lm_eval_runner.build_lm(str(varied_dir), device="cpu", batch_size=4, max_length=320)
    [warning] = [r.getMessage() for r in caplog.records if r.name == lm_eval_model.__name__]
    assert "generation engine is not used (it cannot drive" in warning and lm.engine == "hf"
    run = lm_eval_runner.run_tasks(lm, ["stop_chars"], lm_eval_runner.task_manager([stop_task_dir]))
    assert engine_calls == [] and run.metrics["stop_chars"]["n"] == len(QUESTIONS)


def test_requests_go_to_the_engine_only_with_settings_it_implements():
    from transformers import GenerationConfig

    from eval_harness.engine.model_settings import token_changing_settings
    from eval_harness.lm_eval_model import engine_request_settings as settings_of

    beams = {"until": [], "max_gen_toks": 32, "num_beams": 4, "do_sample": False, "temperature": 0.0}
    assert settings_of(beams, 256)["num_beams"] == 4 and settings_of({**beams, "num_beams": 1}, 256) is not None
    assert settings_of({**beams, "length_penalty": 0.5, "early_stopping": "never"}, 256) is not None
    for other in ({"no_repeat_ngram_size": 3}, {"early_stopping": "sometimes"}, {"do_sample": True}):
        assert settings_of({**beams, **other}, 256) is None, other
    # the beam-search settings are refused in a greedy request (transformers' greedy search ignores them silently)
    assert settings_of({**beams, "num_beams": 1, "length_penalty": 0.5}, 256) is None
    assert token_changing_settings(GenerationConfig(num_beams=4, length_penalty=0.5)) == []
    changing = GenerationConfig(repetition_penalty=1.05, no_repeat_ngram_size=3, min_new_tokens=0)
    assert token_changing_settings(changing) == ["no_repeat_ngram_size", "repetition_penalty"]


def test_a_generation_config_with_logits_processors_keeps_every_request_on_hf(tmp_path, caplog):
    """A repetition penalty in the checkpoint's generation config changes `model.generate`'s tokens, greedy or
    beams: the engine, which does not implement it, is not used."""
    from eval_harness import lm_eval_model

    model = save_varied_checkpoint("llama", tmp_path / "model")
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.3}))
    with caplog.at_level("WARNING", logger=lm_eval_model.__name__):
        lm = lm_eval_runner.build_lm(str(model), device="cpu", batch_size=4, max_length=320)
    [warning] = [r.getMessage() for r in caplog.records if r.name == lm_eval_model.__name__]
    assert "generation config sets repetition_penalty" in warning and lm.engine == "hf"
