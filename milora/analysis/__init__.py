"""Analyses of a finetune against its base (MiLoRA paper, section 5), behind `milora analyze`.

Modules, one job each:

- `metrics`    the math, as pure float64 functions: subspace similarity, amplification factor, spectra,
               next-token divergences (forgetting);
- `weights`    pairs base / tuned linear weights and runs the weight metrics on each, per layer type;
- `forgetting` text corpus -> token blocks -> forgetting loss of the tuned model against the base;
- `loading`    what `--base` / `--tuned` / `--adapter` stand for (checkpoints, PEFT adapters, `milora init`
               directories) and loading them merged in memory;
- `plots`      PNG figures from the report (matplotlib Agg canvas, no pyplot);
- `output`     atomic JSON / PNG writes;
- `report`     `analyze()`: runs everything and writes the output directory;
- `cli`        `milora analyze` argument parsing.
"""

__all__ = ["analyze"]


def __getattr__(name: str):
    # Lazy, so `milora analyze --help` and `import milora.analysis.metrics` skip matplotlib and transformers.
    if name == "analyze":
        from milora.analysis.report import analyze

        return analyze
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
