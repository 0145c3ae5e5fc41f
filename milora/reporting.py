"""How every command reports bad input: one line `<prog>: error: <problem>; <fix>` on stderr and exit status 2
(argparse's status for usage errors), no traceback unless `--debug` is given.

The `milora` subcommands (through `milora.cli`), `python -m milora.gguf` and `python -m eval_harness.cli` run
through `run_reporting_errors`. Nothing here imports a command, so any command may import this module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

DEBUG_FLAG = "--debug"
USAGE_ERROR_STATUS = 2
# Bad input surfaces as ValueError (MiLoRAError, RecipeError, DataError, AnalysisInputError and eval's
# UsageError derive from it) or OSError (a missing file or directory, a checkpoint that cannot be read).
USER_ERRORS = (ValueError, OSError)


class CommandFailed(Exception):
    """A failure that is not bad input but that a subcommand still reports as one line (``milora eval`` does so
    for a suite that crashes); raise it ``from`` the original error, whose traceback ``--debug`` shows."""


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


def run_command(prog: str, run: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """A command's script entry (`python -m ...`): `--debug` taken out of `argv` (default `sys.argv[1:]`), then
    `run_reporting_errors`."""
    rest, debug = split_debug_flag(sys.argv[1:] if argv is None else argv)
    return run_reporting_errors(prog, run, rest, debug)
