"""The `milora` command: one entry point, one subcommand per job.

Each subcommand lives in its own module and exposes `main(argv) -> int`; this file only dispatches,
so `milora --help` stays fast (heavy imports happen inside the chosen subcommand).
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "init": ("milora.commands.init", "precompute the MiLoRA/PiSSA init: residual base model + initial adapter"),
    "merge": ("milora.commands.merge", "merge a trained adapter into a full checkpoint"),
    "convert": ("milora.commands.convert", "convert a MiLoRA/PiSSA adapter into a standard LoRA for the original base"),
    "eval": ("eval_harness.cli", "score a merged checkpoint on a named evaluation suite"),
    "analyze": ("milora.analysis.cli", "subspace similarity, amplification factor and forgetting of a finetune"),
}


def _usage() -> str:
    lines = ["usage: milora <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `milora <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"milora: unknown command {name!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
