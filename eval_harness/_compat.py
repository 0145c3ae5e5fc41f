"""Import shims for installed packages whose imports break on a current environment.

alpaca-eval 0.6.x imports ``pkg_resources`` (for ``parse_version`` and ``get_distribution``), which recent
setuptools no longer ships. `import_alpaca_eval` provides a minimal stand-in for the duration of that import
only (alpaca_eval keeps its reference; nothing else in the process sees the stand-in afterwards).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types


def _pkg_resources_stand_in() -> types.ModuleType:
    from packaging.version import parse as parse_version

    module = types.ModuleType("pkg_resources")
    module.parse_version = parse_version

    def get_distribution(name: str):
        return types.SimpleNamespace(project_name=name, version=importlib.metadata.version(name))

    module.get_distribution = get_distribution
    module.__milora_stand_in__ = True
    return module


def import_alpaca_eval():
    """``import alpaca_eval`` that works with or without ``pkg_resources`` installed."""
    if "alpaca_eval" in sys.modules:
        return sys.modules["alpaca_eval"]
    needs_stand_in = "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None
    if needs_stand_in:
        sys.modules["pkg_resources"] = _pkg_resources_stand_in()
    try:
        return importlib.import_module("alpaca_eval")
    finally:
        if needs_stand_in and getattr(sys.modules.get("pkg_resources"), "__milora_stand_in__", False):
            del sys.modules["pkg_resources"]
