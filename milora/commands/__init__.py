"""Subcommands of the `milora` CLI; each module has `main(argv) -> int`."""
