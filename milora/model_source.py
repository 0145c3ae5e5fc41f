"""What a model argument names, decided once: `ModelSource`.

A model is given as `tiny:<kind>`, a `.gguf` file, a local directory or a hub id, and is a causal LM or a
vision-language model of the LLaVA family. `model_source(name)` works that out where the argument is read (a
recipe's `ModelArguments`, `milora eval --model`), and the loaders (`milora.loading.load_model`,
`load_processing_class`, `is_vision_language`) take the value instead of working it out again. The
vision-language check reads the model's config the first time it is asked for, and only then.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from milora import gguf
from milora.tiny import TINY_PREFIX

TINY, GGUF, LOCAL, HUB = "tiny", "gguf", "local", "hub"
VISION_LANGUAGE_MODEL_TYPES = ("llava", "llava_next", "llava_onevision")


@dataclass(frozen=True)
class ModelSource:
    """A model argument and what it names: `kind` is tiny, gguf, local (a path) or hub (a hub id)."""

    name: str
    kind: str

    def __str__(self) -> str:
        return self.name

    @cached_property
    def model_type(self) -> str:
        """The config's `model_type` (a hub id's config is fetched, or read from the hub cache)."""
        if self.kind == TINY:
            from milora.tiny import tiny_config, tiny_kind

            return tiny_config(tiny_kind(self.name)).model_type
        if self.kind == GGUF:
            return gguf.load_gguf_config(self.name).model_type
        config_file = Path(self.name) / "config.json"
        if config_file.is_file():
            return json.loads(config_file.read_text()).get("model_type", "")
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.name).model_type

    @cached_property
    def vision_language(self) -> bool:
        """A vision-language model of the LLaVA family (loaded as `LlavaForConditionalGeneration`)."""
        return self.model_type in VISION_LANGUAGE_MODEL_TYPES


def model_source(name_or_source: str | os.PathLike | ModelSource) -> ModelSource:
    """The `ModelSource` of a model argument (a `ModelSource` is returned as it is)."""
    if isinstance(name_or_source, ModelSource):
        return name_or_source
    name = str(name_or_source)
    if name.startswith(TINY_PREFIX):
        return ModelSource(name, TINY)
    if gguf.is_gguf_path(name):
        return ModelSource(name, GGUF)
    if "/" not in name.strip("./") or Path(name).exists() or name.startswith((".", "/", "~")):
        return ModelSource(name, LOCAL)
    return ModelSource(name, HUB)
