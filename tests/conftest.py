"""Settings every test shares: an offline Hugging Face stack, the path of the optional shared data, and
`load_script` for the command-line scripts (recipes/, scripts/, benchmarks/) that are files, not packages.

The environment is set here, at import time, because pytest imports this file before any test module or
nested conftest, so transformers / datasets / huggingface_hub read these values when they are first imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(OFFLINE_ENVIRONMENT)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def load_script(path: Path | str, name: str | None = None) -> ModuleType:
    """Import the script at `path` (relative to the repository root or absolute) as module `name` (its file stem).

    The module is registered in `sys.modules` (dataclasses and pickling look it up there); a second call for the
    same file returns the module already loaded, so a test shares it with the scripts that import it by name.
    """
    path = (REPO_ROOT / path).resolve()
    name = name or path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == path:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the script {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def imported_modules(path: str | Path) -> set[str]:
    """The modules a source file imports (at the top or inside functions), by name: `from a.b import c` gives
    `a.b` and `a.b.c`, so a submodule imported that way counts."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the markers
def pytest_collection_modifyitems(items):
    """Several processes and a real model are end-to-end runs too: `-m "not end_to_end"` is the fast lane."""
    for item in items:
        if item.get_closest_marker("multiprocess") or item.get_closest_marker("real_model"):
            item.add_marker(pytest.mark.end_to_end)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The public benchmark data kept beside the checkout (`../shared/data`); the test is skipped without it."""
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"shared data directory {SHARED_DATA_DIR} not present")
    from eval_harness.data_paths import data_root

    return data_root(str(SHARED_DATA_DIR))  # resolved, as the evaluation's data paths are
