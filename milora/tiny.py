"""Tiny models and a tokenizer built from configs, for offline runs, the default recipe and the tests.

Nothing here downloads anything. A recipe names one of these with `model_name_or_path: tiny:<kind>`
(`tiny:llama`, `tiny:qwen2`, `tiny:gpt2`, `tiny:bert`, `tiny:llava`); the weights are random but seeded,
so two builds with the same seed are identical.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

TINY_PREFIX = "tiny:"
TINY_KINDS = ("llama", "qwen2", "gpt2", "bert", "llava")

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]

# A minimal chat template; `{% generation %}` marks assistant text so TRL's `assistant_only_loss` works.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '### Assistant:\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + 5 specials): covers any text, needs no training."""
    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 512
    return tokenizer


def tiny_config(kind: str, vocab_size: int = 261):
    """A config small enough to train in seconds on a CPU, with shapes that exercise every code path."""
    from transformers import (
        BertConfig,
        CLIPVisionConfig,
        GPT2Config,
        LlamaConfig,
        LlavaConfig,
        Qwen2Config,
    )

    if kind == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        )
    if kind == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        )
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    if kind == "bert":
        return BertConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=512, pad_token_id=0,
        )
    if kind == "llava":
        text_config = tiny_config("llama", vocab_size)
        vision_config = CLIPVisionConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, projection_dim=32,
        )
        return LlavaConfig(
            vision_config=vision_config, text_config=text_config, image_token_id=4,
            projector_hidden_act="gelu", vision_feature_layer=-2,
            vision_feature_select_strategy="default", image_seq_length=16,
        )
    raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(TINY_KINDS)}")


def tiny_model(kind: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised (seeded) tiny model of the given kind."""
    from transformers import (
        AutoModelForCausalLM,
        BertForSequenceClassification,
        LlavaForConditionalGeneration,
    )

    from milora.processes import built_in_full, partition_if_zero3

    config = tiny_config(kind)
    torch.manual_seed(seed)
    # Under DeepSpeed ZeRO-3 transformers would build inside zero.Init, leaving the weights uninitialised: build
    # these seeded weights in full, then partition them as from_pretrained partitions a checkpoint.
    with built_in_full():
        if kind == "llava":
            model = LlavaForConditionalGeneration(config)
        elif kind == "bert":
            model = BertForSequenceClassification(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    # Random init leaves a flat spectrum; a few large directions make the principal/minor split meaningful,
    # as it is in pretrained weights.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.nn.Parameter) and weight.ndim == 2 and min(weight.shape) > 8:
                u = torch.randn(weight.shape[0], 4, generator=generator)
                v = torch.randn(4, weight.shape[1], generator=generator)
                weight.add_(0.05 * (u @ v) / weight.shape[1] ** 0.5)
    return partition_if_zero3(model.to(dtype))


def save_tiny_checkpoint(kind: str, path, seed: int = 0):
    """Save `tiny_model(kind, seed)` with its tokenizer (processor for LLaVA) to `path`, like a hub checkpoint."""
    from pathlib import Path

    tiny_model(kind, seed=seed).save_pretrained(path)
    (tiny_processor() if kind == "llava" else tiny_tokenizer()).save_pretrained(path)
    return Path(path)


def is_tiny(name_or_path: str) -> bool:
    return isinstance(name_or_path, str) and name_or_path.startswith(TINY_PREFIX)


def tiny_kind(name_or_path: str) -> str:
    kind = name_or_path[len(TINY_PREFIX):]
    if kind not in TINY_KINDS:
        raise ValueError(
            f"unknown tiny model {name_or_path!r}; use one of "
            + ", ".join(TINY_PREFIX + k for k in TINY_KINDS)
        )
    return kind


def tiny_processor():
    """A LlavaProcessor for `tiny:llava`: CLIP-style image processing at 32x32 and the byte tokenizer."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        do_center_crop=True, do_resize=True, do_normalize=True,
    )
    config = tiny_config("llava")
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
