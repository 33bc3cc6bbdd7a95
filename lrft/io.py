"""Crash-safe writes: everything lrft writes goes to a temporary name in the same folder and is renamed,
so a kill at any moment leaves either the old file or the new one, never half of one. And the one read of a
safetensors file (adapters, PEFT adapters, checkpoints), which turns a missing or damaged file into one line;
and the read of a JSON-lines file of the user's, likewise."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from torch import Tensor

from .errors import UserError


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path | str, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path | str, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_safetensors(path: Path, fix: str) -> dict[str, Tensor]:
    """The tensors of ``path``; a missing file is a UserError that ends with ``fix``."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path.parent} has no {path.name}; {fix}")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise UserError(f"{path} is truncated or corrupt ({exc}); re-save the adapter or use a checkpoint's") from None


def read_json_lines(path: Path | str, what: str, fix: str) -> list[tuple[int, Any]]:
    """(line number, value) of each non-blank line; an unreadable file or a line that is not JSON is one
    UserError naming ``what`` (e.g. "--input FILE"), the line and ``fix``."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} cannot be read ({exc}); {fix}") from None
    values = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                values.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UserError(f"{what}, line {number}: not valid JSON ({exc.msg}); {fix}") from None
    return values


def save_tensors_atomic(path: Path | str, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
