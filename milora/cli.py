"""The `milora` command: one entry point, one subcommand per job.

Each subcommand lives in its own module and exposes `main(argv) -> int`; this file only dispatches,
so `milora --help` stays fast (heavy imports happen inside the chosen subcommand). It reports bad input the same
way for every subcommand (`milora.reporting`): one line `milora <command>: error: <problem>; <fix>` on stderr
and exit status 2, no traceback unless `--debug` is given. Imports go one way: this module imports the
subcommand it runs, never the other way round.
"""

from __future__ import annotations

import importlib
import sys

from milora.reporting import (  # noqa: F401 (CommandFailed, USER_ERRORS: the names subcommands raise and catch)
    DEBUG_FLAG,
    USAGE_ERROR_STATUS,
    USER_ERRORS,
    CommandFailed,
    run_reporting_errors,
    split_debug_flag,
)

SUBCOMMANDS = {
    "init": ("milora.commands.init", "precompute the MiLoRA/PiSSA init: residual base model + initial adapter"),
    "merge": ("milora.commands.merge", "merge a trained adapter into a full checkpoint"),
    "convert": ("milora.commands.convert", "convert a MiLoRA/PiSSA adapter into a standard LoRA for the original base"),
    "eval": ("eval_harness.cli", "score a merged checkpoint on a named evaluation suite"),
    "analyze": ("milora.analysis.cli", "subspace similarity, amplification factor and forgetting of a finetune"),
}


def _usage() -> str:
    lines = ["usage: milora [--debug] <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `milora <command> --help` for the options of one command.",
              f"{DEBUG_FLAG} (before or after the command) shows the Python traceback of an error."]
    return "\n".join(lines)


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
