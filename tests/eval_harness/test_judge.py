"""The judge's API key stays in the process: never in the output folder, the log or an error message.

`milora eval` runs for real on `tiny:llama` against a judge on 127.0.0.1 that cannot be reached (a bound port
that does not listen) or that refuses the key and quotes it back (`StubJudge(refuse_key=True)`).
"""

from __future__ import annotations

import logging
import os
import socket

import pytest

from eval_harness.judge import MASK, JudgeEndpoint, judging
from milora.cli import main as milora_main
from tests.eval_harness.stub_judge import StubJudge

KEY = "sk-milora-test-8f3a91c2d7e4"
ENV_KEY = "sk-from-the-environment-5b6c"


@pytest.fixture
def closed_port():
    """A loopback port held by a socket that does not listen: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _files_quoting(folder, text: str) -> list:
    return [path for path in folder.rglob("*") if path.is_file() and text.encode() in path.read_bytes()]


def _run_eval(suite: str, base_url: str, out, fixtures_dir) -> int:
    data = {"alpaca_eval": ["--alpaca_eval_file", str(fixtures_dir / "alpaca_eval_sample.json")],
            "followbench": ["--followbench_file", str(fixtures_dir / "followbench_sample.json")]}[suite]  # fmt: skip
    return milora_main(["eval", "--suite", suite, "--model", "tiny:llama", *data, "--limit", "2", "--output_dir",
                        str(out), "--judge_base_url", base_url, "--judge_api_key", KEY, "--judge_model", "stub-judge",
                        "--max_gen_toks", "4", "--device", "cpu"])  # fmt: skip


@pytest.mark.parametrize("suite", ["alpaca_eval", "followbench"])
def test_a_judge_that_refuses_the_key_is_named_and_the_key_is_nowhere(
    suite, tmp_path, fixtures_dir, capfd, caplog, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    with StubJudge(refuse_key=True) as judge:
        status = _run_eval(suite, judge.base_url, out, fixtures_dir)
    assert judge.requests and judge.requests[0]["auth"] == f"Bearer {KEY}"  # the key did reach the judge
    assert status == 2
    printed = capfd.readouterr()
    [line] = [line for line in printed.err.splitlines() if line.startswith("milora eval: error:")]
    assert f"the judge at {judge.base_url} refused the API key (HTTP 401)" in line and "--judge_api_key" in line
    assert KEY not in printed.out + printed.err and KEY not in caplog.text
    if suite == "alpaca_eval":  # alpaca_eval logs the server's error, which quotes the key: masked
        assert f"Incorrect API key provided: {MASK}" in caplog.text
    assert _files_quoting(out, KEY) == []
    assert os.environ["OPENAI_API_KEY"] == ENV_KEY  # the key was this process's only while judging


def test_an_unreachable_judge_is_named_and_the_key_is_nowhere(tmp_path, fixtures_dir, capfd, caplog, closed_port):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    base_url = f"http://127.0.0.1:{closed_port}/v1"
    assert _run_eval("alpaca_eval", base_url, out, fixtures_dir) == 2
    printed = capfd.readouterr()
    [line] = [line for line in printed.err.splitlines() if line.startswith("milora eval: error:")]
    assert f"the judge at {base_url} could not be reached" in line
    assert KEY not in printed.out + printed.err and KEY not in caplog.text
    client_config = out / "annotator" / "weighted_alpaca_eval_gpt4_turbo_endpoint" / "client_config.yaml"
    assert base_url in client_config.read_text()
    assert _files_quoting(out, KEY) == []
    assert "OPENAI_API_KEY" not in os.environ


def test_judging_masks_the_key_in_log_records_and_errors(caplog, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    endpoint = JudgeEndpoint(base_url="http://127.0.0.1:9/v1", api_key=KEY)
    with pytest.raises(RuntimeError) as raised, judging(endpoint):
        assert os.environ["OPENAI_API_KEY"] == KEY
        try:
            raise KeyError(f"no account for {KEY}")
        except KeyError:
            logging.getLogger("some.library").exception("client %s failed", KEY)
            raise
    assert "OPENAI_API_KEY" not in os.environ
    assert str(raised.value) == f"KeyError: 'no account for {MASK}'" and raised.value.__cause__ is None
    assert KEY not in caplog.text and f"client {MASK} failed" in caplog.text
    assert f"KeyError: 'no account for {MASK}'" in caplog.text  # the traceback is kept, masked
    with pytest.raises(ValueError, match="invalid literal"), judging(endpoint):  # other errors pass as they are
        int("not a number")
