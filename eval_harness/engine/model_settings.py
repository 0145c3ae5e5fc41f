"""What of a model's own generation settings the engine honours: its end-of-sequence tokens, and the
generation-config fields that would make `model.generate` produce other tokens than the engine does."""

from __future__ import annotations

# Generation-config fields that add logits processors or stopping criteria to greedy or beam search, with the
# values that add none (transformers' `GenerationMixin._get_logits_processor` and `_get_stopping_criteria`).
NEUTRAL_GENERATION_CONFIG = {
    "repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "min_length": (None, 0),
    "min_new_tokens": (None, 0), "bad_words_ids": (None,), "sequence_bias": (None,), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "exponential_decay_length_penalty": (None,), "guidance_scale": (None, 1.0), "renormalize_logits": (None, False),
    "remove_invalid_values": (None, False), "watermarking_config": (None,), "max_time": (None,),
    "stop_strings": (None,),
}  # fmt: skip


def token_changing_settings(generation_config) -> list[str]:
    """The fields of a model's generation config that make `model.generate` add logits processors or stopping
    criteria (which the engine does not implement)."""
    return sorted(
        name
        for name, neutral in NEUTRAL_GENERATION_CONFIG.items()
        if getattr(generation_config, name, None) not in neutral
    )


def eos_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end `model.generate`: the generation config's EOS ids, else the tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def beam_defaults(generation_config) -> tuple[float, bool | str]:
    """`length_penalty` and `early_stopping` as `model.generate` takes them from the model's generation config."""
    penalty = getattr(generation_config, "length_penalty", None)
    early = getattr(generation_config, "early_stopping", None)
    return (1.0 if penalty is None else float(penalty)), (False if early is None else early)
