"""Deterministic lm-eval models for exact-score tests: real `lm_eval.api.model.LM` subclasses, run by lm-eval.

`OracleLM` answers each prompt with the response registered for the one key the prompt contains (the gold
answer of the data row whose question it is, or a chosen wrong one), so that a task's whole pipeline -- doc
conversion, prompt, answer extraction, aggregation -- must give exactly the expected score. `ConstantLM`
answers every prompt with the same text.
"""

from __future__ import annotations

from lm_eval.api.model import LM


class OracleLM(LM):
    """Answers a prompt with the response of the (single) key the prompt contains."""

    def __init__(self, responses: dict[str, str]):
        super().__init__()
        self.responses = responses
        self.prompts: list[str] = []

    def respond(self, context: str) -> str:
        matches = [answer for key, answer in self.responses.items() if key in context]
        assert len(matches) == 1, f"{len(matches)} responses for the prompt {context[:200]!r}"
        return matches[0]

    def generate_until(self, requests, disable_tqdm: bool = False):
        self.prompts += [request.args[0] for request in requests]
        return [self.respond(request.args[0]) for request in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("generation tasks only")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("generation tasks only")


class ConstantLM(OracleLM):
    """Answers every prompt with `text`."""

    def __init__(self, text: str):
        super().__init__({})
        self.text = text

    def respond(self, context: str) -> str:
        return self.text
