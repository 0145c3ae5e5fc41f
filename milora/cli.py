"""The `milora` command: one entry point, one subcommand per job.

Each subcommand lives in its own module and exposes `main(argv) -> int`; this file only dispatches,
so `milora --help` stays fast (heavy imports happen inside the chosen subcommand). It also reports bad input
the same way for every subcommand: one line `milora <command>: error: <problem>; <fix>` on stderr and exit
status 2 (argparse's status for usage errors), no traceback unless `--debug` is given.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

SUBCOMMANDS = {
    "init": ("milora.commands.init", "precompute the MiLoRA/PiSSA init: residual base model + initial adapter"),
    "merge": ("milora.commands.merge", "merge a trained adapter into a full checkpoint"),
    "convert": ("milora.commands.convert", "convert a MiLoRA/PiSSA adapter into a standard LoRA for the original base"),
    "eval": ("eval_harness.cli", "score a merged checkpoint on a named evaluation suite"),
    "analyze": ("milora.analysis.cli", "subspace similarity, amplification factor and forgetting of a finetune"),
}
DEBUG_FLAG = "--debug"
USAGE_ERROR_STATUS = 2
# Bad input surfaces as ValueError (MiLoRAError, RecipeError, DataError, AnalysisInputError and eval's
# UsageError derive from it) or OSError (a missing file or directory, a checkpoint that cannot be read).
USER_ERRORS = (ValueError, OSError)


class CommandFailed(Exception):
    """A failure that is not bad input but that a subcommand still reports as one line (``milora eval`` does so
    for a suite that crashes); raise it ``from`` the original error, whose traceback ``--debug`` shows."""


def _usage() -> str:
    lines = ["usage: milora [--debug] <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `milora <command> --help` for the options of one command.",
              f"{DEBUG_FLAG} (before or after the command) shows the Python traceback of an error."]
    return "\n".join(lines)


def split_debug_flag(argv: Sequence[str]) -> tuple[list[str], bool]:
    """`argv` without any `--debug` before a `--` separator, and whether one was there (argparse finds it, so
    it may stand before or after the command; everything else is left, in order, to the subcommand)."""
    flag_parser = argparse.ArgumentParser(prog="milora", add_help=False, allow_abbrev=False)
    flag_parser.add_argument(DEBUG_FLAG, action="store_true")
    parsed, rest = flag_parser.parse_known_args(list(argv))
    return rest, parsed.debug


def error_line(prog: str, error: BaseException) -> str:
    """`<prog>: error: <message>` on one line (third-party messages may span several)."""
    message = " ".join(str(error).split()) or type(error).__name__
    return f"{prog}: error: {message}"


def run_reporting_errors(prog: str, run: Callable[[list[str]], int | None], argv: list[str], debug: bool) -> int:
    """`run(argv)`'s exit status; bad input (and `CommandFailed`) is printed as one line with status 2, or
    re-raised when `debug` (for `CommandFailed`, the error it was raised from)."""
    try:
        return int(run(argv) or 0)
    except (*USER_ERRORS, CommandFailed) as error:
        if debug:
            if isinstance(error, CommandFailed) and error.__cause__ is not None:
                raise error.__cause__ from None
            raise
        print(error_line(prog, error), file=sys.stderr)
        return USAGE_ERROR_STATUS


def main(argv: list[str] | None = None) -> int:
    argv, debug = split_debug_flag(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"milora: unknown command {name!r}.\n\n{_usage()}", file=sys.stderr)
        return USAGE_ERROR_STATUS
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return run_reporting_errors(f"milora {name}", module.main, rest, debug)


if __name__ == "__main__":
    sys.exit(main())
