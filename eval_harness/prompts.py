"""The evaluation protocols' prompts, re-exported from `milora.prompts` (their one home, shared with training).

- Commonsense reasoning follows LLM-Adapters: `alpaca_prompt`, the training prompt of the Alpaca/commonsense
  format; the model answers with an option word (``true``/``false``, ``solution1``, ``answer3``, ...).
- GSM8K and MATH follow MetaMath: `metamath_prompt` here is MetaMath's *evaluation* prompt
  (`milora.prompts.metamath_eval_prompt`: the training prompt with the response primed by
  "Let's think step by step.").
"""

from __future__ import annotations

from milora.prompts import (
    ALPACA_HEADER,
    ALPACA_HEADER_WITH_INPUT,
    METAMATH_RESPONSE_PRIMER,
    alpaca_prompt,
)
from milora.prompts import metamath_eval_prompt as metamath_prompt

__all__ = ["ALPACA_HEADER", "ALPACA_HEADER_WITH_INPUT", "METAMATH_RESPONSE_PRIMER", "alpaca_prompt", "metamath_prompt"]
