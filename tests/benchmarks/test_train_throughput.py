"""benchmarks/train_throughput.py on the tiny model, CPU: the saved batches, one worker per kind of variant, the
table, the FLOP count, and one real run of the command line (so a GPU run does not fail on a typo)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT, load_script

BENCHMARKS = REPO_ROOT / "benchmarks"
tt = load_script(BENCHMARKS / "train_throughput.py")  # first: it imports the modules below by name
mfu = load_script(BENCHMARKS / "mfu.py")
tb = load_script(BENCHMARKS / "throughput_batches.py")
markdown_table = load_script(BENCHMARKS / "throughput_table.py").markdown_table

SMOKE = {"model": "tiny", "r": 8, "warmup": 1, "steps": 2, "batch_size": 4, "token_budget": 160, "seed": 0}


@pytest.fixture(scope="module")
def data():
    return tb.build_batches(SMOKE, vocab_size=261)


def test_batches_are_deterministic_and_share_rows(data):
    assert tb.build_batches(SMOKE, vocab_size=261) == data
    count = SMOKE["warmup"] + SMOKE["steps"]
    fixed, budget = data["groupings"]["fixed"], data["groupings"]["budget"]
    assert len(fixed) == len(budget) == count
    assert all(len(batch) == SMOKE["batch_size"] for batch in fixed)
    assert all(sum(lengths) <= SMOKE["token_budget"] for lengths in tb.batch_lengths(data, "budget"))
    for groups in (fixed, budget):  # consecutive rows, in order, from the first
        flat = [i for batch in groups for i in batch]
        assert flat == list(range(len(flat)))
    for row in data["rows"]:
        prompt = row["labels"].count(-100)
        assert 0 < prompt < len(row["input_ids"]) and row["labels"][prompt:] == row["input_ids"][prompt:]


def test_row_lengths_follow_the_stated_distribution():
    totals = [total for _, total in tb.row_lengths(5000, seed=0)]
    assert min(totals) >= 100 and max(totals) <= 600
    assert 235 < sum(totals) / len(totals) < 265  # mean ~250


def test_step_flops_formula():
    # 2 sequences of 3 and 1 tokens: 4 tokens, 6 + 1 causal pairs
    expected = 4 * 10 * 4 + 6 * 2 * 4 + 12 * 2 * 4 * 7
    assert mfu.step_flops([3, 1], frozen=10, trainable=2, n_layers=2, d_attn=4) == expected


def test_linear_weight_counts_split_frozen_base_and_adapters():
    from milora import apply_milora
    from milora.tiny import tiny_config, tiny_model

    config = tiny_config("llama")
    model = apply_milora(tiny_model("llama"), tt.TARGETS, 4, method="lora", show_progress=False)
    frozen, trainable = mfu.linear_weight_counts(model)
    d, ff = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * d // config.num_attention_heads
    per_layer = d * d * 2 + 2 * d * kv + 3 * d * ff
    assert frozen == config.num_hidden_layers * per_layer + d * config.vocab_size
    lora = 4 * ((d + d) + 2 * (d + kv) + 2 * (d + ff))  # q, k, v, up, down
    assert trainable == config.num_hidden_layers * lora


@pytest.mark.parametrize("variant", ["trl_defaults", "milora_recipe", "lora_fast", "lora_lowmem", "qmilora_lowmem",
                                     "lora_fast_fp8"])
def test_worker_trains_on_the_saved_batches(data, variant, tmp_path):
    result = tt.run_worker(variant, data, str(tmp_path / "trainer"))
    grouping = tt.VARIANTS[variant].grouping
    measured = tb.batch_lengths(data, grouping)[SMOKE["warmup"]:]
    assert len(result["step_times_s"]) == SMOKE["steps"]
    assert result["tokens"] == sum(map(sum, measured))
    assert result["tokens_per_s"] == pytest.approx(result["tokens"] / sum(result["step_times_s"]))
    expected_rows = [data["rows"][i]["input_ids"] for batch in data["groupings"][grouping] for i in batch]
    assert result["batches_digest"] == tb.rows_digest(expected_rows)
    assert torch.isfinite(torch.tensor(result["training_loss"]))
    assert result["frozen_linear_weights"] > 0 and result["trainable_linear_weights"] > 0
    settings = result["settings"]
    if variant == "trl_defaults":
        assert settings["gradient_checkpointing"] and not settings["padding_free"]
    if variant == "qmilora_lowmem":  # the packed 4-bit weights count as the matrices they stand for
        assert settings["load_in_4bit"] and settings["gradient_checkpointing"]
        bf16 = tt.run_worker("lora_lowmem", data, str(tmp_path / "bf16"))
        assert result["frozen_linear_weights"] == bf16["frozen_linear_weights"]
    if variant == "lora_fast_fp8":  # the same run as lora_fast but for the FP8 frozen GEMMs
        plain = tt.run_worker("lora_fast", data, str(tmp_path / "plain"))
        assert settings["fp8_base"] and not plain["settings"]["fp8_base"]
        assert {k: v for k, v in settings.items() if k != "fp8_base"} == {
            k: v for k, v in plain["settings"].items() if k != "fp8_base"}
        assert result["training_loss"] == pytest.approx(plain["training_loss"], rel=0.01)
        config = tt.model_config(data["spec"])
        assert result["fp8_layers"] == 7 * config.num_hidden_layers and plain["fp8_layers"] == 0
    if variant == "lora_fast":
        assert not settings["gradient_checkpointing"] and settings["attention"] == tt.VARLEN_ATTENTION
        assert settings["micro_batch"] is None and not result["varlen_kernel"]  # CPU: the sdpa fallback
    if variant == "milora_recipe":  # the recipe's own settings; a per-device batch that covers the step is one forward
        recipe = tt.recipe_settings("milora")
        assert settings["gradient_checkpointing"] == recipe["gradient_checkpointing"]
        assert settings["attention"] == recipe["attn_implementation"]
        per_device = recipe["per_device_train_batch_size"]
        assert settings["micro_batch"] == (None if per_device >= SMOKE["batch_size"] else per_device)


def test_padded_batches_hold_the_token_budget_and_change_no_loss(data, tmp_path, monkeypatch):
    """pad_to_budget (the CUDA-graph variants' one shape), without the compilation: every batch the model sees holds
    exactly token_budget tokens, and the padding adds nothing to the loss."""
    padded = dataclasses.replace(tt.VARIANTS["lora_fast"], pad_to_budget=True)
    monkeypatch.setitem(tt.VARIANTS, "lora_fast_padded_test", padded)
    shapes = []
    collate = tt.RecordingCollator.__call__

    def recording_shapes(self, examples):
        batch = collate(self, examples)
        shapes.append(tuple(batch["input_ids"].shape))
        return batch

    monkeypatch.setattr(tt.RecordingCollator, "__call__", recording_shapes)
    result = tt.run_worker("lora_fast_padded_test", data, str(tmp_path / "padded"))
    assert shapes and set(shapes) == {(1, SMOKE["token_budget"])}
    shapes.clear()
    plain = tt.run_worker("lora_fast", data, str(tmp_path / "plain"))
    assert all(tokens < SMOKE["token_budget"] for _, tokens in shapes)  # so the padding above was real
    assert result["tokens"] == plain["tokens"]  # tokens/s counts the real tokens only
    assert result["training_loss"] == pytest.approx(plain["training_loss"], rel=1e-4)
    assert result["settings"]["pad_to_budget"] and not plain["settings"]["pad_to_budget"]


def _fake_run(variant, repeat, tokens_per_s, step, grouping="fixed", digest="d1"):
    settings = {"attention": "sdpa", "gradient_checkpointing": True, "liger": False, "padding_free": True,
                "grouping": grouping, "micro_batch": None, "lora_dropout": 0.05}
    return {"variant": variant, "repeat": repeat, "device": "cpu", "date": "today", "torch": "t", "transformers": "t",
            "peft": "p", "trl": "t", "spec": SMOKE, "settings": settings, "varlen_kernel": False,
            "median_step_s": step, "tokens_per_s": tokens_per_s, "median_tokens_per_step": 100, "mfu": 0.3,
            "peak_mem_gib": 1.0, "training_loss": 5.0, "batches_digest": digest}


def test_table_medians_ratios_and_batch_check(tmp_path):
    runs = [_fake_run("trl_defaults", 0, 100, 1.0), _fake_run("trl_defaults", 1, 120, 0.8),
            _fake_run("lora_fast", 0, 300, 0.5), _fake_run("milora_fast", 0, 294, 0.51, digest="d2")]
    files = []
    for i, run in enumerate(runs):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(run))
    (tmp_path / "x.failed.json").write_text(json.dumps({"variant": "lora_recipe", "repeat": 0, "error": "OOM"}))
    table = markdown_table([*files, tmp_path / "x.failed.json"], order=list(tt.VARIANTS))
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "110" in rows["trl_defaults"] and "±9.1%" in rows["trl_defaults"]  # median and spread of 100, 120
    assert "2.73x" in rows["lora_fast"]  # 300 / 110
    assert "1.020" in rows["milora_fast"]  # 0.51 / 0.5
    assert "WARNING: the fixed runs saw different batches" in table
    assert "lora_recipe repeat 0 FAILED: OOM" in table


@pytest.mark.end_to_end
def test_command_line_smoke_run_resumes_and_refuses_bad_input(tmp_path, capsys):
    script = str(BENCHMARKS / "train_throughput.py")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, script, "--smoke", "--variants", "lora_fast", "--repeats", "1",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| lora_fast |" in run.stdout and (out / "table.md").exists() and (out / "batches.json").exists()
    result = json.loads((out / "lora_fast__r0.json").read_text())
    assert result["spec"]["model"] == "tiny" and result["variant"] == "lora_fast"

    # the same command again, in this process (a worker would be a new process): nothing is rerun
    tt.main(["--smoke", "--variants", "lora_fast", "--repeats", "1", "--out", str(out)])
    again = capsys.readouterr().out
    assert "| lora_fast |" in again and "rc=" not in again

    with pytest.raises(SystemExit) as bad:  # argparse's one-line error, no traceback
        tt.main(["--smoke", "--variants", "lora_fastest", "--out", str(out)])
    assert bad.value.code == 2 and "unknown variant(s) lora_fastest" in capsys.readouterr().err


def test_lora_twin_and_paired_step_ratio():
    table = load_script(BENCHMARKS / "throughput_table.py")
    assert table.lora_twin("milora_fast") == "lora_fast" and table.lora_twin("pissa_fast") == "lora_fast"
    assert table.lora_twin("milora_fast_cached") == "lora_fast" and table.lora_twin("lora_fast") is None
    assert table.lora_twin("qmilora_lowmem") == "qlora_lowmem" and table.lora_twin("qpissa_lowmem") == "qlora_lowmem"
    assert table.lora_twin("qlora_fast") is None
    assert table.lora_twin("milora_fast_fp8") == "lora_fast_fp8"
    lora = [{"repeat": 0, "step_times_s": [1.0, 2.0]}, {"repeat": 1, "step_times_s": [2.0, 2.0]}]
    milora = [{"repeat": 0, "step_times_s": [1.5, 1.5]}, {"repeat": 1, "step_times_s": [2.0, 2.4]},
              {"repeat": 2, "step_times_s": [9.0, 9.0]}]  # no LoRA run in round 2: not compared
    assert table.step_ratio(milora, lora) == pytest.approx((1.0 + 1.1) / 2)  # rounds: 3/3 and 4.4/4


@pytest.mark.end_to_end
def test_cached_init_and_profile_runs(tmp_path, capsys):
    """milora_fast_cached: one process computes the factors, the timed run loads them; --profile writes the
    kernel table of two steps. (The orchestration runs in this process; each run is a worker process.)"""
    out = tmp_path / "out"
    tt.main(["--smoke", "--variants", "milora_fast_cached", "--repeats", "1", "--profile", "--out", str(out)])
    assert "milora_fast_cached__prepare_cache: rc=0" in capsys.readouterr().out
    assert len([p for p in (out / "init_cache").iterdir() if p.is_dir()]) == 1  # the timed runs found the cache
    result = json.loads((out / "milora_fast_cached__r0.json").read_text())
    assert result["init_cache"] and "profiled" not in result
    profiled = json.loads((out / "milora_fast_cached__profile.json").read_text())
    assert profiled["profiled"] and profiled["profile"]["profiled_steps"] == 2
    assert "aten::mm" in (out / "milora_fast_cached__profile.txt").read_text()
