"""The error type for bad input to milora, in a module of its own that imports nothing heavy.

`milora.gguf` (and through it the `milora` subcommands' argument checks) raise it without importing
`milora.model`, which pulls in torch, transformers and peft; `milora.model` re-exports the same class.
"""

from __future__ import annotations


class MiLoRAError(ValueError):
    """Bad input to MiLoRA initialisation; the message names the problem and the fix."""
