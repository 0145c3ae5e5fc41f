"""milora's evaluation harness: score merged checkpoints the way the MiLoRA paper does.

- ``tasks/``: lm-eval task YAMLs (``--include_path eval_harness/tasks``): the LLM-Adapters commonsense sets,
  GSM8K and MATH with MetaMath's prompt (IFEval runs as lm-eval's own task); `local_tasks` writes variants
  that read local files.
- `commonsense`, `math_grading`, `followbench`, `vqa_scoring`: answer extraction and scoring, as pure
  functions; `ifeval` provides the sentence model lm-eval's IFEval checkers need, offline.
- `alpaca_eval_runner` + `judge`: AlpacaEval 2 / FollowBench with a judge on any OpenAI-compatible server.
- `generation`, `llava_generation`: batched, left-padded generation for text and LLaVA checkpoints.
- `cli` (``milora eval``) with one runner per suite in `suites`; `data_paths` (where data is read from),
  `lm_eval_runner`, `results` (the atomic JSON/Markdown reports), `errors` (one-line usage errors).
"""
