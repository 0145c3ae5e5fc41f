"""Parse `[RECIPE.yaml | --config RECIPE.yaml] [--key value ...]` into a checked `Recipe`, with TRL's `TrlParser`.

The YAML sets the parser's defaults and the command line overrides them (TrlParser's design); the dataclasses
resolve their own defaults as they are built (`milora.sft.config`). This module adds four things, each in one
place: a leading recipe path means `--config PATH`; keys the dataclasses do not have (TrlParser's remaining
strings) are an error listing the valid keys; input paths not found from the current directory are looked up
beside the recipe file, so recipes can name their bundled data as `data/...` from anywhere; a list key takes
its values space- or comma-separated.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass, fields

from trl import TrlParser

from milora.sft.checks import check_recipe
from milora.sft.config import DataArguments, MiloraSFTConfig, ModelArguments, RecipeError
from milora.tiny import is_tiny

RECIPE_TYPES = (DataArguments, ModelArguments, MiloraSFTConfig)
# Keys naming local inputs, resolved beside the recipe file when not found from the current directory.
INPUT_PATH_KEYS = ("model_name_or_path", "milora_init_dir", "dataset_name", "chat_template_path", "image_folder")
_COMMA_SEPARATED_NAMES = re.compile(r"\s*[\w.\-/]*(?:\s*,\s*[\w.\-/]*)+\s*")


@dataclass
class Recipe:
    """A parsed recipe: the three dataclasses and the YAML it came from."""

    data: DataArguments
    model: ModelArguments
    training: MiloraSFTConfig
    path: str | None = None


class RecipeParser(TrlParser):
    """TrlParser for the recipe dataclasses: errors as `RecipeError`, no abbreviated options, and the namespace
    argparse fills has its input paths resolved beside the recipe before the dataclasses are built from it."""

    def __init__(self, recipe_path: str | None = None):
        super().__init__(RECIPE_TYPES, allow_abbrev=False)
        self.recipe_path = recipe_path

    def error(self, message):  # argparse would print usage and exit; a recipe error is more useful to callers
        raise RecipeError(message)

    def parse_known_args(self, args=None, namespace=None):
        namespace, remaining = super().parse_known_args(args, namespace)
        for key in INPUT_PATH_KEYS:
            setattr(namespace, key, resolve_input_path(getattr(namespace, key), self.recipe_path))
        for action in self._actions:
            if action.nargs in ("+", "*") and isinstance(getattr(namespace, action.dest, None), list):
                setattr(namespace, action.dest, split_comma_lists(getattr(namespace, action.dest)))
        return namespace, remaining


def split_comma_lists(values: list) -> list:
    """A list key's values with comma-separated names split (`--lora_target_modules q_proj,v_proj` as
    `q_proj v_proj`); anything else, a regex with a comma among them, stays as given."""
    split = []
    for value in values:
        if isinstance(value, str) and _COMMA_SEPARATED_NAMES.fullmatch(value):
            split.extend(name.strip() for name in value.split(",") if name.strip())
        else:
            split.append(value)
    return split


def valid_keys() -> dict[str, list[str]]:
    """Recipe keys by dataclass."""
    return {cls.__name__: [f.name for f in fields(cls) if f.init] for cls in RECIPE_TYPES}


def unknown_key_error(keys: list[str], source: str) -> RecipeError:
    groups = valid_keys()
    every = [k for names in groups.values() for k in names] + ["env"]
    hints = []
    for key in keys:
        close = difflib.get_close_matches(key, every, n=3, cutoff=0.6)
        hints.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    listing = "\n".join(f"  {name}: {', '.join(names)}" for name, names in groups.items())
    return RecipeError(
        f"unknown recipe key{'s' if len(keys) > 1 else ''} {', '.join(hints)} in {source}. Valid keys:\n{listing}"
    )


def option_names(strings: list[str]) -> list[str]:
    """The key names among TrlParser's remaining strings (`--key`, `--key=value`), or the strings themselves."""
    names = [s[2:].split("=", 1)[0] for s in strings if s.startswith("--")]
    return names or list(strings)


def with_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """The recipe path and the arguments as TrlParser reads them: a leading recipe path becomes `--config PATH`.
    The `deepspeed` launcher's `--local_rank=N`, which it puts before the script's own arguments, moves after them."""
    args = list(argv)
    launcher_args = []
    while args and args[0].startswith("--local_rank="):
        launcher_args.append(args.pop(0))
    if args and not args[0].startswith("-"):
        args.insert(0, "--config")
    args += launcher_args
    positions = [i for i, arg in enumerate(args) if arg == "--config"]
    if any(i + 1 >= len(args) for i in positions):
        raise RecipeError("--config needs a recipe path")
    if len(positions) > 1:
        raise RecipeError(f"two recipes given ({' and '.join(args[i + 1] for i in positions)}); pass one")
    recipe_path = args[positions[0] + 1] if positions else None
    if recipe_path is not None and not os.path.isfile(recipe_path):
        raise RecipeError(f"recipe file not found: {recipe_path}")
    return recipe_path, args


def resolve_input_path(value: str | None, recipe_path: str | None) -> str | None:
    """A local input path as given (relative to the current directory) or, failing that, relative to the
    recipe's directory; hub ids and `tiny:` names unchanged."""
    if not isinstance(value, str) or is_tiny(value):
        return value
    expanded = os.path.expanduser(value)
    if os.path.exists(expanded):
        return expanded
    if recipe_path and not os.path.isabs(expanded):
        beside = os.path.join(os.path.dirname(os.path.abspath(recipe_path)), expanded)
        if os.path.exists(beside):
            return beside
    return value


def parse_recipe(argv: list[str] | None = None) -> Recipe:
    """Parse and check a recipe (`sys.argv[1:]` by default); a bad one raises `RecipeError`."""
    import yaml

    recipe_path, args = with_config_flag(sys.argv[1:] if argv is None else argv)
    parser = RecipeParser(recipe_path)
    try:
        data, model, training, recipe_rest, command_line_rest = parser.parse_args_and_config(
            args, return_remaining_strings=True, separate_remaining_strings=True
        )
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {recipe_path} is not valid YAML: {error}") from None
    except RecipeError:
        raise
    except ValueError as error:  # TRL's and TrainingArguments' own checks of the values
        raise RecipeError(str(error)) from None
    if recipe_rest:
        raise unknown_key_error(option_names(recipe_rest[0::2]), recipe_path)
    if command_line_rest:
        raise unknown_key_error(option_names(command_line_rest), "the command line")
    recipe = Recipe(data, model, training, recipe_path)
    check_recipe(recipe)
    return recipe
