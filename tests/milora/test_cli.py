"""`milora` error reporting: bad input is one line `milora <command>: error: ...` on stderr with exit status 2
and no traceback; `--debug` (before or after the command) shows the traceback instead."""

from __future__ import annotations

import subprocess
import sys

import pytest

from milora.cli import CommandFailed, run_reporting_errors, split_debug_flag
from milora.cli import main as milora_cli
from milora.model import MiLoRAError

TOO_LARGE_RANK = ["init", "--model", "tiny:llama", "--targets", "q_proj", "--r", "100000"]


def run_milora(*args: str) -> subprocess.CompletedProcess:
    """The real command in a fresh interpreter, so that stderr holds exactly what a user sees."""
    return subprocess.run([sys.executable, "-m", "milora.cli", *args], capture_output=True, text=True, timeout=300)


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.end_to_end
def test_rank_too_large_is_one_line_without_traceback(tmp_path):
    result = run_milora(*TOO_LARGE_RANK, "--out", str(tmp_path / "init"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("milora init: error:")]
    assert len(error_lines) == 1, result.stderr
    assert "q_proj" in error_lines[0] and "r <= " in error_lines[0] and "100000" in error_lines[0]
    assert not (tmp_path / "init").exists()


@pytest.mark.end_to_end
def test_debug_shows_the_traceback(tmp_path):
    result = run_milora("--debug", *TOO_LARGE_RANK, "--out", str(tmp_path / "init"))
    assert result.returncode != 0 and result.returncode != 2
    assert "Traceback" in result.stderr and "MiLoRAError" in result.stderr


@pytest.mark.parametrize("position", ["global", "after the command"])
def test_debug_reraises_in_process(tmp_path, position):
    argv = [*TOO_LARGE_RANK, "--out", str(tmp_path / "init")]
    argv = ["--debug", *argv] if position == "global" else [*argv, "--debug"]
    with pytest.raises(MiLoRAError, match="r <= "):
        milora_cli(argv)


def test_plain_lora_is_refused(tmp_path, capsys):
    assert milora_cli(["init", "--model", "tiny:llama", "--r", "4", "--method", "lora", "--out", str(tmp_path)]) == 2
    [line] = stderr_lines(capsys)
    assert line.startswith("milora init: error: plain LoRA needs no precomputed init;")
    assert "--method milora, pissa, mid, random" in line


def test_unknown_method_is_refused(tmp_path, capsys):
    assert milora_cli(["init", "--model", "tiny:llama", "--r", "4", "--method", "minor", "--out", str(tmp_path)]) == 2
    [line] = stderr_lines(capsys)
    assert line.startswith("milora init: error: unknown method 'minor'; choose one of milora, pissa")


def test_deprecated_mode_flag_still_works(tmp_path, capsys):
    from milora.init_dir import read_init_record

    out = tmp_path / "init"
    assert milora_cli(["init", "--model", "tiny:llama", "--r", "4", "--mode", "principal", "--out", str(out)]) == 0
    assert "--mode is deprecated and goes in the next release; use --method pissa" in capsys.readouterr().err
    assert read_init_record(out).method == "pissa" and read_init_record(out).solver == "auto"


def test_missing_model_directory_is_named(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert milora_cli(["init", "--model", str(missing), "--r", "4", "--out", str(tmp_path / "init")]) == 2
    [line] = stderr_lines(capsys)
    assert line.startswith("milora init: error: --model ") and str(missing) in line and "tiny:KIND" in line


def test_merge_bad_paths(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert milora_cli(["merge", "--base", str(missing), "--adapter", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    [line] = stderr_lines(capsys)
    assert line.startswith("milora merge: error: --base ") and str(missing) in line

    assert milora_cli(["merge", "--base", "tiny:llama", "--adapter", str(missing), "--out", str(tmp_path / "m")]) == 2
    [line] = stderr_lines(capsys)
    assert line.startswith("milora merge: error: --adapter ") and "adapter_config.json" in line
    assert not (tmp_path / "m").exists()


def test_convert_bad_adapter(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert milora_cli(["convert", "--adapter", str(tmp_path / "empty"), "--initial_adapter", str(tmp_path / "x"),
                       "--out", str(tmp_path / "lora")]) == 2
    [line] = stderr_lines(capsys)
    assert line.startswith("milora convert: error: ") and "empty" in line and "adapter_config.json" in line


def test_analyze_missing_base(tmp_path, capsys):
    missing = tmp_path / "missing_base"
    assert milora_cli(["analyze", "--base", str(missing), "--tuned", "tiny:llama", "--out", str(tmp_path / "a")]) == 2
    [line] = stderr_lines(capsys)
    assert line.startswith("milora analyze: error: --base ") and str(missing) in line


def test_usage_errors_keep_argparse_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        milora_cli(["init", "--model", "tiny:llama"])  # --r and --out missing
    assert exit_info.value.code == 2
    assert "required" in capsys.readouterr().err


def test_split_debug_flag():
    assert split_debug_flag(["init", "--debug", "--r", "4"]) == (["init", "--r", "4"], True)
    assert split_debug_flag(["--debug", "merge"]) == (["merge"], True)
    assert split_debug_flag(["eval", "--", "--debug"]) == (["eval", "--", "--debug"], False)
    assert split_debug_flag(["convert"]) == (["convert"], False)


def test_run_reporting_errors_reports_a_command_failure_in_one_line_and_debug_raises_its_cause(capsys):
    def crashing_command(argv: list[str]) -> int:
        try:
            return {"known": 0}[argv[0]]
        except KeyError as error:
            raise CommandFailed(f"KeyError: {error}; run again with --debug for the traceback") from error

    assert run_reporting_errors("milora x", crashing_command, ["unknown"], debug=False) == 2
    [line] = stderr_lines(capsys)
    assert line == "milora x: error: KeyError: 'unknown'; run again with --debug for the traceback"
    with pytest.raises(KeyError, match="unknown") as raised:
        run_reporting_errors("milora x", crashing_command, ["unknown"], debug=True)
    assert raised.traceback[-1].name == "crashing_command"  # the traceback of the failure itself


EVAL_ENTRY_POINTS = {"milora eval": [sys.executable, "-m", "milora.cli", "eval"],
                     "python -m eval_harness.cli": [sys.executable, "-m", "eval_harness.cli"]}  # fmt: skip


@pytest.mark.end_to_end
@pytest.mark.parametrize("entry_point,debug_position", [("milora eval", "first"),
                                                        ("python -m eval_harness.cli", "last")])
def test_eval_reports_bad_input_like_every_command_and_debug_shows_the_traceback(tmp_path, entry_point,
                                                                                 debug_position):
    """Each entry point in its own process; `--debug` before the options for one, after them for the other (both
    positions for both run in process: `test_debug_reraises_eval_errors_in_process`)."""
    command = [*EVAL_ENTRY_POINTS[entry_point], "--suite", "gsm8k", "--model", str(tmp_path / "missing")]
    plain = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr, plain.stderr
    [line] = [line for line in plain.stderr.splitlines() if line.strip()]
    assert line.startswith("milora eval: error: --model ") and str(tmp_path / "missing") in line
    debug_command = [*command[:3], "--debug", *command[3:]] if debug_position == "first" else [*command, "--debug"]
    debugged = subprocess.run(debug_command, capture_output=True, text=True, timeout=300)
    assert debugged.returncode not in (0, 2), debugged.stderr
    assert "Traceback" in debugged.stderr and "UsageError: --model " in debugged.stderr


@pytest.mark.parametrize("position", ["global", "after the command"])
def test_debug_reraises_eval_errors_in_process(tmp_path, position):
    from eval_harness.errors import UsageError

    argv = ["eval", "--suite", "gsm8k", "--model", str(tmp_path / "missing")]
    argv = ["--debug", *argv] if position == "global" else [*argv, "--debug"]
    with pytest.raises(UsageError, match="--model"):
        milora_cli(argv)
