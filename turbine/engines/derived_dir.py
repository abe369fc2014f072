"""Directories derived once from a source file (a GGUF's converted model, its tokenizer files) and
cached by the file's version: its path, size and modification time, and the writer's format.

A directory is built under a temporary name and renamed into place with a marker file naming its
source, so a concurrent start sees either nothing or a complete directory, and a later start reuses
it. Shared by the torch engine's GGUF conversion and the upstream sidecar's tokenizer directories.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

COMPLETE = ".turbine-complete"
"""Marker written last into a finished directory; holds the source file's path."""


def version_key(path: Path, fmt: object) -> str:
    """A key that changes when `path` (resolved) or the writer's format `fmt` does; OSError if the
    file cannot be read."""
    st = path.stat()
    return hashlib.sha256(f"{fmt}:{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def is_complete(out: Path) -> bool:
    return (out / COMPLETE).is_file()


def build_once(out: Path, source: Path, build: Callable[[Path], object]) -> Path:
    """`out`, built by `build(tmp)` into a temporary sibling and renamed into place (with the marker)
    unless it is complete already. What `build` raises propagates; nothing half-written is left."""
    if is_complete(out):
        return out
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        (tmp / COMPLETE).write_text(str(source) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
