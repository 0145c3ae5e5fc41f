"""Prompt templates of the paper's evaluation protocols, as pure string functions.

- Commonsense reasoning follows LLM-Adapters: an Alpaca-style instruction prompt, the model answers with an
  option word (``true``/``false``, ``solution1``, ``answer3``, ...).
- GSM8K and MATH follow MetaMath: the same Alpaca header, the problem as the instruction, and the response
  primed with "Let's think step by step."
"""

from __future__ import annotations

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
METAMATH_RESPONSE_PRIMER = "Let's think step by step."


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca / LLM-Adapters generation prompt; the `### Input:` block appears only for a non-empty input."""
    if input_text and input_text.strip():
        return (
            f"{ALPACA_HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n"
            "### Response:\n"
        )
    return f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def metamath_prompt(query: str) -> str:
    """The MetaMath evaluation prompt used for GSM8K and MATH (no trailing newline after the primer)."""
    return f"{ALPACA_HEADER}\n\n### Instruction:\n{query}\n\n### Response: {METAMATH_RESPONSE_PRIMER}"
