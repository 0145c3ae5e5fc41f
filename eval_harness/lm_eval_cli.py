"""lm-eval's command line with milora's lm-eval model registered: ``python -m eval_harness.lm_eval_cli ...``.

lm-eval 0.4 looks models up in its own registry only (no plugin entry points), so a model a package
registers must be imported before lm-eval's command line runs; this module does that and hands over:

    python -m eval_harness.lm_eval_cli run --model milora --model_args pretrained=<merged checkpoint> \\
        --include_path eval_harness/tasks --tasks milora_gsm8k --batch_size 8 --output_path results/

Every argument is lm-eval's own (``lm_eval --help``); ``--model_args`` also takes milora's ``engine``,
``max_slots``, ``max_gen_toks_cap`` and ``generations_dir`` (`eval_harness.lm_eval_model`).
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import eval_harness.lm_eval_model  # noqa: F401  (registers the model "milora")

    cli_evaluate()


if __name__ == "__main__":
    main()
