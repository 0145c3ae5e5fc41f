"""Every prompt template, in one place: training formats a row with the same function evaluation prompts with.

- Alpaca / LLM-Adapters (commonsense, math10K): instruction (+ optional input) -> `### Response:\\n`.
- MetaMath (MetaMathQA, GSM8K, MATH): the Alpaca header, the problem as the instruction. Training rows end the
  prompt with `### Response:\\n`; MetaMath's evaluation primes the response with "Let's think step by step."
- LLaVA-1.5 (`vicuna_v1`): the system line that opens every conversation.
"""

from __future__ import annotations

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
RESPONSE_MARKER = "### Response:"
METAMATH_RESPONSE_PRIMER = "Let's think step by step."
METAMATH_ANSWER_MARKER = "The answer is: "

VICUNA_V1_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """LLM-Adapters' prompt for an instruction; the `### Input:` block only for a non-empty input."""
    if input and input.strip():
        return (
            f"{ALPACA_HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
            f"{RESPONSE_MARKER}\n"
        )
    return f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}\n\n{RESPONSE_MARKER}\n"


def metamath_prompt(query: str) -> str:
    """The MetaMath training prompt for a math question (the response follows on the next line)."""
    return f"{ALPACA_HEADER}\n\n### Instruction:\n{query}\n\n{RESPONSE_MARKER}\n"


def metamath_eval_prompt(query: str) -> str:
    """MetaMath's evaluation prompt for GSM8K and MATH: the training prompt with the response primed by
    "Let's think step by step." on the marker's line (as MetaMath's eval scripts write it)."""
    return f"{ALPACA_HEADER}\n\n### Instruction:\n{query}\n\n{RESPONSE_MARKER} {METAMATH_RESPONSE_PRIMER}"
