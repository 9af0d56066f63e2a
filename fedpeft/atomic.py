"""Atomic writes: a reader (or a crash) never sees a half-written file or folder.

Files go to a temp file in the same directory and are moved into place with os.replace, which is
atomic on POSIX. A folder is built in a temp sibling and swapped in; the previous folder is only
deleted after the new one is in place, so a failure at any point leaves the old state intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty temp folder; on success it replaces `dest` whole, on error it is removed."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        # mkdtemp (and some writers) create 0700/0600 entries; give the result the usual umask modes
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for child in tmp.rglob("*"):
            os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~umask)
            if child.is_file():
                _fsync_file(child)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """manifest.json: the sha256 of every other file in `folder`; write it last, inside atomic_dir."""
    files = {
        p.name: sha256_file(p) for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != MANIFEST
    }
    (Path(folder) / MANIFEST).write_text(json.dumps({"sha256": files}, indent=1, sort_keys=True) + "\n")


def manifest_problem(folder: Path, required: tuple[str, ...] = ()) -> str | None:
    """Why `folder` does not match its manifest (the first file that differs, or a `required` file the
    manifest does not cover), or None when every file does. Catches what a structural check cannot:
    flipped bytes inside tensor data (bit rot, a bad copy)."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["sha256"]
        names = sorted(files)
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for name in required:
        if name not in files:
            return f"{MANIFEST} does not cover {name}"
    for name in names:
        path = folder / name
        if "/" in name or name in ("", ".", "..") or not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != files[name]:
            return f"{name} does not match its sha256"
    return None
