"""File I/O in one place: atomic writes (an output directory or file appears whole or not at all),
JSON / JSON Lines reading and writing, and safetensors files read with a one-line error when damaged."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike):
    """Yield a temporary sibling directory; on success it replaces `out_dir` in one rename.

    A crash leaves any previous `out_dir` intact (a stale `.tmp-*` sibling at most).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, out_dir)


def replace_directory(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the fully written directory `source` to `target` in one rename; an existing `target` is replaced
    (moved aside first, then deleted), so `target` is never missing or half written."""
    source, target = Path(source), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)  # left by a crashed earlier process with this pid
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same directory, fsync, then `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text writes str, got {type(text).__name__}")
    return atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike):
    """The parsed content of a JSON file."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def iter_jsonl(path: str | os.PathLike) -> Iterator:
    """The rows of a JSON Lines file, one at a time (blank lines skipped); a bad line raises ValueError
    naming file and line."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from None


def read_jsonl(path: str | os.PathLike) -> list:
    """The rows of a JSON Lines file (blank lines skipped); a bad line raises ValueError naming file and line."""
    return list(iter_jsonl(path))


def read_json_rows(path: str | os.PathLike) -> list:
    """Rows from a `.jsonl` file or a `.json` file holding a list (as LLM-Adapters and LLaVA ship them)."""
    if str(path).endswith(".jsonl"):
        return read_jsonl(path)
    rows = read_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows, found {type(rows).__name__}")
    return rows


def write_json(path: str | os.PathLike, value, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write `value` as JSON, atomically (with a trailing newline); `sort_keys` sorts the keys of every object."""
    return atomic_write_text(path, json.dumps(value, indent=indent, ensure_ascii=False, sort_keys=sort_keys) + "\n")


def write_jsonl(path: str | os.PathLike, rows) -> Path:
    """Write rows as JSON Lines, atomically."""
    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


class DamagedFileError(OSError):
    """A file that exists but cannot be read whole (truncated, partly written); the message names it and the fix."""


def _damaged(path, error: Exception) -> DamagedFileError:
    reason = " ".join(str(error).split())
    return DamagedFileError(
        f"{path} is damaged ({reason}): it was truncated or only partly written; write it again (for a training "
        "run's outputs: rerun with resume_from_checkpoint: true)"
    )


def safetensors_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names of a safetensors file, reading only its header."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:  # safetensors raises its own SafetensorError (not an OSError) for a bad header
        raise _damaged(path, error) from error


def read_safetensors(path: str | os.PathLike) -> dict:
    """All tensors of a safetensors file (on CPU); a truncated or garbled file raises `DamagedFileError`."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except Exception as error:
        raise _damaged(path, error) from error


def write_safetensors(path: str | os.PathLike, tensors: dict) -> Path:
    """Write tensors as a safetensors file, atomically."""
    from safetensors.torch import save

    return atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
