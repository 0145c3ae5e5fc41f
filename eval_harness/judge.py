"""The LLM judge endpoint: any OpenAI-compatible chat-completions server (OpenAI, vLLM, llama.cpp, a stub).

`JudgeEndpoint` names the server (base URL, API key, model); `ask_judge` sends one prompt with greedy
decoding and returns the text. AlpacaEval reaches the same endpoint through its own client (see
`eval_harness.alpaca_eval_runner`); FollowBench uses `ask_judge`.

The API key stays in this process: both ways of asking run inside `judging`, which hands the key to the OpenAI
client through this process's environment (never a file), masks it in every log record, and turns the judge's
errors into one line that names the endpoint, never the key.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from tqdm.auto import tqdm

from eval_harness.errors import UsageError

DEFAULT_JUDGE_MODEL = "gpt-4-1106-preview"
API_KEY_ENV = "OPENAI_API_KEY"  # where the OpenAI client (also alpaca_eval's) looks when given no key
NO_KEY = "EMPTY"
MASK = "***"


@dataclass(frozen=True)
class JudgeEndpoint:
    """Where the judge lives. A local server usually ignores the key, but the OpenAI client wants one."""

    base_url: str | None = None
    api_key: str | None = None
    model: str = DEFAULT_JUDGE_MODEL

    def resolved_api_key(self) -> str:
        return self.api_key or os.environ.get(API_KEY_ENV) or NO_KEY

    def resolved_base_url(self) -> str | None:
        return self.base_url or os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_BASE")

    def is_configured(self) -> bool:
        """Whether a judge is named: a server URL (flag or environment), or a key for OpenAI's own API."""
        return bool(self.resolved_base_url() or self.api_key or os.environ.get(API_KEY_ENV))

    def describe(self) -> str:
        return self.resolved_base_url() or "OpenAI's API"

    def client(self):
        from openai import OpenAI

        return OpenAI(api_key=self.resolved_api_key(), base_url=self.resolved_base_url(), max_retries=2)


def ask_judge(
    endpoint: JudgeEndpoint, prompts: Sequence[str], max_tokens: int = 1024, desc: str = "judging"
) -> list[str]:
    """The judge's answer to each prompt (temperature 0, one user message each)."""
    answers = []
    with judging(endpoint):
        client = endpoint.client()
        for prompt in tqdm(prompts, desc=desc, unit="prompt"):
            completion = client.chat.completions.create(
                model=endpoint.model,
                messages=[{"role": "user", "content": prompt}],
                temperature=0.0,
                max_tokens=max_tokens,
            )
            answers.append(completion.choices[0].message.content or "")
    return answers


def mask(text: str, key: str) -> str:
    """`text` with the API key masked (the placeholder used without a key is no secret)."""
    return text.replace(key, MASK) if key and key != NO_KEY else text


@contextmanager
def judging(endpoint: JudgeEndpoint) -> Iterator[None]:
    """While the judge is asked: its key in this process's environment (``OPENAI_API_KEY``, restored after),
    masked in every log record, and the judge's errors as one line naming the endpoint (`judge_error`)."""
    key = endpoint.resolved_api_key()
    previous = os.environ.get(API_KEY_ENV)
    os.environ[API_KEY_ENV] = key
    try:
        with _masked_in_logs(key):
            yield
    except Exception as error:
        shown = judge_error(endpoint, error, key)
        if shown is error:
            raise
        raise shown from None  # the original (or an error it chains) may quote the key
    finally:
        if previous is None:
            os.environ.pop(API_KEY_ENV, None)
        else:
            os.environ[API_KEY_ENV] = previous


def judge_error(endpoint: JudgeEndpoint, error: Exception, key: str) -> Exception:
    """`error` as the user should see it: what the judge at its endpoint did, with the key masked."""
    import openai

    where = f"the judge at {endpoint.describe()}"
    detail = mask(" ".join(str(error).split()), key)
    if isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError):
        return UsageError(
            f"{where} refused the API key (HTTP {error.status_code})", "check --judge_api_key or OPENAI_API_KEY"
        )
    if isinstance(error, openai.APIConnectionError):
        return UsageError(f"{where} could not be reached ({detail})", "start the server or fix --judge_base_url")
    if isinstance(error, openai.APIStatusError):
        return RuntimeError(f"{where} answered HTTP {error.status_code}: {detail}")
    traceback_text = "".join(traceback.format_exception(error))
    return RuntimeError(f"{type(error).__name__}: {detail}") if mask(traceback_text, key) != traceback_text else error


@contextmanager
def _masked_in_logs(key: str) -> Iterator[None]:
    """Every log record made meanwhile, by any logger, carries the key masked (message and traceback)."""
    make_record = logging.getLogRecordFactory()

    def masked_record(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            record.msg, record.args = mask(record.getMessage(), key), ()
        except Exception:  # noqa: BLE001 - a bad format string is the handler's to report, as without masking
            return record
        if record.exc_info:  # formatted now, masked; handlers print exc_text as it is
            record.exc_text = mask(logging.Formatter().formatException(record.exc_info), key)
            record.exc_info = None
        return record

    logging.setLogRecordFactory(masked_record)
    try:
        yield
    finally:
        logging.setLogRecordFactory(make_record)
