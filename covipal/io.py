"""Atomic writes: an output is either the complete new version or the previous one."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _alive(pid: str) -> bool:
    """Whether process ``pid`` (a string from a temporary's name) still runs."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process not yet reaped (a zombie) still answers kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (a file or a directory).

    On success the temporary replaces ``path``; on an exception it is removed and the
    exception re-raised, so ``path`` keeps its previous content and no partial output
    is left behind. A process killed outright (SIGKILL) leaves its hidden temporary
    ``.<name>.tmp-<pid>``; the next write of ``path`` removes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed run
        if not _alive(stale.name.rsplit("-", 1)[-1]):
            _remove(stale)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)  # a leftover from a killed run with the same pid
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # os.replace cannot overwrite a non-empty directory
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON (sorted keys, indent 2) atomically, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, sort_keys=True, indent=2) + "\n")


def content_hash(path: str | Path, pattern: str = "**/*", skip_hidden: bool = False) -> str:
    """SHA-256 (first 16 hex digits) of the files under ``path`` matching ``pattern``: names and bytes.

    ``path`` may be a file. With ``skip_hidden``, files with a path part starting with ``.``
    (``.git``, ``.cache`` bookkeeping beside a downloaded checkpoint) are left out.
    """
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.glob(pattern) if p.is_file())
    for f in files:
        rel = f.relative_to(path) if f != path else Path(f.name)
        if skip_hidden and any(part.startswith(".") for part in rel.parts):
            continue
        digest.update(str(rel).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
