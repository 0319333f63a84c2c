"""Safe file writing: every output is written to a temp name of this process's own and renamed into place when
complete, so a killed run leaves the old file or the new one, never half of one; and the sha256 of files.

Used by: every step, and the modules that write (features, heads, models, plots).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from .common import CatDogError, log


def temp_name(path: str | Path, suffix: str = "") -> Path:
    """A hidden temp name beside `path`, this process's and call's own: two runs never share a half file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_TEMP_COUNTER)}.partial{suffix}")
    _MINE.add(tmp.name)
    return tmp


_TEMP_COUNTER = itertools.count()
# The temp names this process made: a temp of our pid that is not among them was left by an earlier process that
# had the same pid (containers start every run with the same few pids), so it may be removed; ours may be in use.
_MINE: set[str] = set()
# temp_name's names: `.<name>.<pid>.<n>.partial`, then the suffix a writer insisted on (`.keras`, `.png`, `.zip`).
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<n>\d+)\.partial(?:\.[^.]+)?$")


def is_temp(path: str | Path) -> bool:
    """Whether `path` is named like a temp file or folder of temp_name."""
    return _TEMP_RE.match(Path(path).name) is not None


def result_files(folder: str | Path, pattern: str) -> list[Path]:
    """The files or folders matching `pattern` under `folder`, sorted, without hidden ones (pathlib's glob
    matches dotfiles: a killed run's `.NAME.keras.<pid>.0.partial.keras` must never be listed as a result)."""
    folder = Path(folder)
    return sorted(p for p in folder.glob(pattern)
                  if not any(part.startswith(".") for part in p.relative_to(folder).parts))


def check_writable_target(path: str | Path) -> Path:
    """Refuse a target that an atomic write's rename would destroy: a directory, device, FIFO or socket
    (a symlink counts as what it points to). A missing path or a regular file is fine."""
    path = Path(path)
    if path.is_dir():
        raise CatDogError(f"{path} is a directory: give a file name")
    if path.exists() and not path.is_file():
        raise CatDogError(f"{path} exists and is not a regular file (a device, FIFO or socket): give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # the nearest existing folder must be a folder
        parent = parent.parent
    if not parent.is_dir():
        raise CatDogError(f"{parent} is a file, not a folder: give another path")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `path`, renamed onto it only if the block succeeds. `suffix` keeps an extension
    some writers insist on (Keras wants `.keras`); a symlink to a regular file in the same folder (or below it)
    stays and its target is replaced; one that leads out of the folder is refused. Dead runs' temps in the folder
    are removed first."""
    path = check_writable_target(path)
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(path.parent.resolve()):
            raise CatDogError(f"{path} is a symlink to {target}, outside its folder {path.parent}: writes never "
                              f"follow a link out of their folder; remove the link or give another path")
        path = target
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    """Write a CSV atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_json(obj: dict, path: str | Path) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in blocks (models are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temps(folder: str | Path, pattern: str = ".*.partial*") -> None:
    """Remove temp files and folders (named by temp_name: `.<name>.<pid>.<n>.partial[.suffix]`) matching
    `pattern` in `folder` that were left by runs no longer alive (killed, or the machine restarted); those of a
    running process are its own business, and so are this process's own."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for tmp in folder.glob(pattern):
        m = _TEMP_RE.match(tmp.name)
        if m is None:
            continue  # not a name of ours
        pid = int(m["pid"])
        if pid == os.getpid():
            if tmp.name in _MINE:
                continue  # one of this process's writes, perhaps in progress
        elif pid > 0:  # os.kill(0, ...) would signal our own process group
            try:
                os.kill(pid, 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except PermissionError:  # alive, under another user
                continue
            except OverflowError:  # no such pid can exist
                pass
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def read_json(path: Path) -> dict | None:
    """A JSON object a step wrote, or None when missing; unreadable counts as missing, with a warning."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except ValueError:  # empty, garbled or not UTF-8
        obj = None
    if not isinstance(obj, dict):
        log.warning(f"{path} is not a JSON object written by this step: treated as absent")
        return None
    return obj
