"""The LLM judge endpoint: any OpenAI-compatible chat-completions server (OpenAI, vLLM, llama.cpp, a stub).

`JudgeEndpoint` names the server (base URL, API key, model); `ask_judge` sends one prompt with greedy
decoding and returns the text. AlpacaEval reaches the same endpoint through its own client (see
`eval_harness.alpaca_eval_runner`); FollowBench uses `ask_judge`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

DEFAULT_JUDGE_MODEL = "gpt-4-1106-preview"


@dataclass(frozen=True)
class JudgeEndpoint:
    """Where the judge lives. A local server usually ignores the key, but the OpenAI client wants one."""

    base_url: str | None = None
    api_key: str | None = None
    model: str = DEFAULT_JUDGE_MODEL

    def resolved_api_key(self) -> str:
        return self.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"

    def resolved_base_url(self) -> str | None:
        return self.base_url or os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_BASE")

    def is_configured(self) -> bool:
        """Whether a judge is named: a server URL (flag or environment), or a key for OpenAI's own API."""
        return bool(self.resolved_base_url() or self.api_key or os.environ.get("OPENAI_API_KEY"))

    def client(self):
        from openai import OpenAI

        return OpenAI(api_key=self.resolved_api_key(), base_url=self.resolved_base_url(), max_retries=2)


def ask_judge(
    endpoint: JudgeEndpoint, prompts: Sequence[str], max_tokens: int = 1024, desc: str = "judging"
) -> list[str]:
    """The judge's answer to each prompt (temperature 0, one user message each)."""
    client = endpoint.client()
    answers = []
    for prompt in tqdm(prompts, desc=desc, unit="prompt"):
        completion = client.chat.completions.create(
            model=endpoint.model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0.0,
            max_tokens=max_tokens,
        )
        answers.append(completion.choices[0].message.content or "")
    return answers
