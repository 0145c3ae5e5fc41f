"""The error `milora eval` reports as one line (``milora eval: error: <problem>; <fix>``, exit status 2).

A ValueError, as all of milora's bad-input errors are: `milora.reporting.run_reporting_errors` reports it.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user: what is wrong and how to fix it (`fix` left out where `problem` says both)."""

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(f"{problem}; {fix}" if fix else problem)
        self.problem = problem
        self.fix = fix
