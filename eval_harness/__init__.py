"""milora's evaluation harness: score merged checkpoints the way the MiLoRA paper does.

- ``tasks/``: lm-eval task YAMLs (``--include_path eval_harness/tasks``): the LLM-Adapters commonsense sets,
  GSM8K and MATH with MetaMath's prompt, IFEval; `local_tasks` writes variants that read local files.
- `commonsense`, `math_grading`, `ifeval`, `followbench`, `vqa_scoring`: answer extraction and scoring, as
  pure functions.
- `alpaca_eval_runner` + `judge`: AlpacaEval 2 / FollowBench with a judge on any OpenAI-compatible server.
- `generation`, `llava_generation`: batched, left-padded greedy generation for text and LLaVA checkpoints.
- `lm_eval_runner`, `results`, `cli`: the ``milora eval`` command and its atomic JSON/Markdown reports.
"""
