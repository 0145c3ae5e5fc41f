"""The recipe runtime behind `recipes/sft.py`, one module per step of a run:

- `config`: the dataclasses a recipe fills (`DataArguments`, `ModelArguments`, `MiloraSFTConfig`), each resolving
  its own defaults in `__post_init__`;
- `parsing`: YAML + command line -> a `Recipe`, with TRL's `TrlParser`; `checks`: what must hold before loading;
- `data` (text, via `milora.data`) and `llava` (LLaVA): the datasets, collator and trainer settings they need;
- `model`: the tokenizer and the PEFT model (method applied, or a `milora init` directory loaded);
- `outputs`: the initial adapter, then the adapter, standard-LoRA conversion, merged checkpoint and run summary.
"""
