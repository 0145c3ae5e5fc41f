"""AlpacaEval 2 through the real `alpaca_eval` package, with a judge on any OpenAI-compatible server.

- `model_output_records` puts generations in AlpacaEval's format: a list of
  ``{instruction, output, generator, dataset}``.
- `write_annotator_config` derives an annotator from one of alpaca_eval's shipped configs (by default
  ``weighted_alpaca_eval_gpt4_turbo``, the AlpacaEval 2 judge) with the judge's model name, a client config
  pointing at the endpoint's base URL, chat-format requests and zero price; the shipped prompt template is
  kept. The client config holds no key: the OpenAI client alpaca_eval builds from it reads the key from this
  process's environment, where `run_alpaca_eval` puts it (`eval_harness.judge.judging`) while it runs.
- `run_alpaca_eval` calls ``alpaca_eval.main.evaluate`` with those outputs and the reference outputs and
  returns its leaderboard row: win rate, standard error, discrete win rate and, where alpaca_eval can fetch
  its length-control data (the hub), the length-controlled win rate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from eval_harness._compat import import_alpaca_eval
from eval_harness.judge import JudgeEndpoint, judging
from milora.io import atomic_write_text, read_json_rows

DEFAULT_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
LOGGER = logging.getLogger(__name__)


def model_output_records(
    instructions: Sequence[str], outputs: Sequence[str], generator: str, datasets: Sequence[str] | None = None
) -> list[dict[str, str]]:
    """Generations in AlpacaEval's model-outputs format."""
    if len(instructions) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs for {len(instructions)} instructions")
    datasets = datasets or ["alpaca_eval"] * len(instructions)
    return [
        {"instruction": i, "output": o, "generator": generator, "dataset": d}
        for i, o, d in zip(instructions, outputs, datasets, strict=True)
    ]


def load_eval_set(path: str | Path) -> list[dict[str, Any]]:
    """The AlpacaEval set with its reference outputs: a JSON list or JSONL of {instruction, output, ...}."""
    rows = read_json_rows(path)
    for row in rows:
        if "instruction" not in row or "output" not in row:
            raise ValueError(f"{path}: every row needs 'instruction' and the reference 'output'")
        row.setdefault("generator", "reference")
        row.setdefault("dataset", "alpaca_eval")
    return rows


def shipped_annotator_dir(name: str) -> Path:
    import_alpaca_eval()
    from alpaca_eval import constants

    directory = Path(constants.EVALUATORS_CONFIG_DIR) / name
    if not (directory / "configs.yaml").is_file():
        raise ValueError(f"alpaca_eval has no annotator config named {name!r}")
    return directory


def write_annotator_config(out_dir: str | Path, judge: JudgeEndpoint, base_annotator: str = DEFAULT_ANNOTATOR) -> Path:
    """An annotator directory under out_dir for the judge endpoint; returns the path of its configs.yaml."""
    source_dir = shipped_annotator_dir(base_annotator)
    source = yaml.safe_load((source_dir / "configs.yaml").read_text())
    if len(source) != 1:
        raise ValueError(f"{base_annotator}: expected one annotator in configs.yaml, found {list(source)}")
    ((name, config),) = source.items()
    target_dir = Path(out_dir) / f"{base_annotator}_endpoint"

    client_config = {"default": [{"base_url": judge.resolved_base_url()}]}  # the key: see `judging`
    client_config_path = target_dir / "client_config.yaml"
    atomic_write_text(client_config_path, yaml.safe_dump(client_config))

    config = dict(config)
    template = Path(config["prompt_template"])
    config["prompt_template"] = str(template if template.is_absolute() else Path(source_dir).parent / template)
    kwargs = dict(config.get("completions_kwargs") or {})
    kwargs.update(
        model_name=judge.model,
        client_config_path=str(client_config_path),
        requires_chatml=True,  # always chat completions, whatever the local model is called
        price_per_token=0.0,
        num_procs=1,
    )
    config["completions_kwargs"] = kwargs
    config_path = target_dir / "configs.yaml"
    return atomic_write_text(config_path, yaml.safe_dump({name: config}, sort_keys=False))


def winrate_with_length_control(annotations) -> dict[str, Any]:
    """alpaca_eval's length-controlled metric, or its plain win rate when the GLM data can't be fetched."""
    import_alpaca_eval()
    from alpaca_eval import metrics

    try:
        return metrics.get_length_controlled_winrate(annotations, save_weights_dir=None)
    except Exception as error:  # noqa: BLE001 - offline: the GLM needs a hub file
        LOGGER.warning("length-controlled win rate unavailable (%s); reporting the plain win rate", error)
        result = metrics.get_winrate(annotations)
        result["length_controlled_winrate"] = None
        result["length_control_error"] = f"{type(error).__name__}: {error}"[:300]
        return result


def run_alpaca_eval(
    model_outputs: Sequence[dict],
    reference_outputs: Sequence[dict],
    annotator_config: str | Path,
    output_dir: str | Path,
    judge: JudgeEndpoint,
    max_instances: int | None = None,
) -> dict[str, Any]:
    """Judge the model outputs against the reference outputs with alpaca_eval, asking `judge` (the endpoint
    `annotator_config` was written for, which brings the key); returns the model's row."""
    import pandas as pd

    import_alpaca_eval()
    from alpaca_eval.main import evaluate

    with judging(judge):
        leaderboard, _annotations = evaluate(
            model_outputs=pd.DataFrame(list(model_outputs)),
            reference_outputs=pd.DataFrame(list(reference_outputs)),
            annotators_config=str(annotator_config),
            output_path=str(output_dir),
            precomputed_leaderboard=None,
            is_return_instead_of_print=True,
            is_cache_leaderboard=False,
            fn_metric=winrate_with_length_control,
            sort_by="win_rate",
            max_instances=max_instances,
        )
    generator = model_outputs[0]["generator"]
    row = leaderboard.loc[generator].to_dict()
    return {key: value for key, value in row.items() if key != "mode"}
