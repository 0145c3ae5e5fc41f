"""A deterministic OpenAI-compatible judge on loopback, for the AlpacaEval and FollowBench tests.

It serves ``POST /v1/chat/completions`` from a thread-backed `http.server` bound to 127.0.0.1 (port picked by
the OS) and records every request. Its rules:

- AlpacaEval pairwise prompt (identifiers ``m`` and ``M``): the output that alone contains the word
  ``EXCELLENT`` wins, else the longer one; the answer comes with ``logprobs.top_logprobs`` as the weighted
  AlpacaEval 2 annotator expects (winner at probability 0.99).
- FollowBench prompt: one ``'YES'`` per constraint if the response contains ``SATISFIED``; otherwise ``'YES'``
  for the first constraint only.

``StubJudge(refuse_key=True)`` answers every request with HTTP 401 and an error that quotes the key it was sent,
as careless servers do.
"""

from __future__ import annotations

import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WIN_WORD = "EXCELLENT"
SATISFIED_WORD = "SATISFIED"


_ALPACA_OUTPUT = re.compile(r'"model_identifier": "(m|M)",\s*"output": """(.*?)"""', re.DOTALL)


def alpaca_winner(prompt: str) -> str:
    """ "m" or "M": the identifier whose output alone contains the win word, else the longer output ("m" on a tie)."""
    outputs = dict(_ALPACA_OUTPUT.findall(prompt))
    if set(outputs) != {"m", "M"}:
        raise ValueError("not an AlpacaEval pairwise prompt")
    has_word = {key: WIN_WORD in text for key, text in outputs.items()}
    if has_word["m"] != has_word["M"]:
        return "m" if has_word["m"] else "M"
    return "M" if len(outputs["M"]) > len(outputs["m"]) else "m"


def followbench_answer(prompt: str) -> str:
    level = int(re.search(r"Python LIST with (\d+) element", prompt).group(1))
    response = re.split(r"constraints?#\n", prompt)[-1].split("\n\n#System#")[0]
    verdicts = ["YES"] * level if SATISFIED_WORD in response else ["YES"] + ["NO"] * (level - 1)
    return "1) constraints identified.\n2) checked.\n" + str(verdicts)


def _token_logprob(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def chat_completion(body: dict) -> dict:
    prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
    logprobs = None
    if '"model_identifier": "M"' in prompt:
        content = alpaca_winner(prompt)
        loser = "M" if content == "m" else "m"
        top = [_token_logprob(content, math.log(0.99)), _token_logprob(loser, math.log(0.01))]
        logprobs = {"content": [dict(_token_logprob(content, math.log(0.99)), top_logprobs=top)]}
    elif "Python LIST with" in prompt:
        content = followbench_answer(prompt)
    else:
        content = "I am a stub judge."
    return {
        "id": "stub-1",
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", "stub"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": logprobs,
            }
        ],
        "usage": {
            "prompt_tokens": len(prompt.split()),
            "completion_tokens": 1,
            "total_tokens": len(prompt.split()) + 1,
        },
    }


class StubJudge:
    """Context manager: ``with StubJudge() as judge: judge.base_url`` -> ``http://127.0.0.1:<port>/v1``."""

    def __init__(self, refuse_key: bool = False):
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                stub.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                if not self.path.endswith("/chat/completions"):
                    self.send_error(404)
                    return
                if refuse_key:
                    key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                    answer = {"error": {"message": f"Incorrect API key provided: {key}", "code": "invalid_api_key"}}
                    status = 401
                else:
                    answer, status = chat_completion(body), 200
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> StubJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
