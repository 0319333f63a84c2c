"""Safe file writing: every output is written to a temp name of this process's own and renamed into place when
complete, so a killed run leaves the old file or the new one, never half of one; the sha256 of files; names and
paths read from files kept inside their folder, and outputs that would overwrite an input refused; state as plain
JSON; and the lock that keeps two runs from writing one folder's shared files.

Used by: every step, and the modules that write (features, heads, models, plots); 01 (its lock on the data dir);
06 (to_plain: its trials as JSON).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import itertools
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
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


def no_space(where: Path, doing: str, need: int, hint: str = "") -> CatDogError:
    """The error for a full disk, once the partial output is gone: how much room the step needs, and where."""
    amount = f": it needs about {need / 1e6:,.1f} MB free there" if need else ""
    return CatDogError(f"no space left on the disk of {where}/ while {doing}{amount}; the partial output was "
                       f"removed: free some space{hint} and rerun")


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


def inside(path: str | Path, folder: str | Path, source: str | Path) -> Path:
    """`path` (relative ones are relative to `folder`), resolved (symlinks followed) and refused unless it lies
    inside `folder`: a path read from the file `source` never reaches outside the folder it belongs to."""
    folder = Path(folder).resolve()
    resolved = (folder / path).resolve()
    if not resolved.is_relative_to(folder):
        raise CatDogError(f"{source} names {path}, which lies outside {folder}: a file that sends a step outside its "
                          f"folder is not one catdog wrote; remove it (or the folder), or rerun the step that makes it")
    return resolved


def check_outputs(outputs: list[tuple[Path, str]], inputs: dict[Path, str]) -> None:
    """Refuse, before any work, a run whose outputs ((path, what it is): a list, as two may be one path) would
    overwrite one another or one of its inputs (path -> what it is; files, or folders whose every file is one);
    symlinks count as what they point to."""
    def real(p: Path) -> Path:
        return Path(os.path.realpath(p))

    def overlap(a: Path, b: Path) -> bool:
        return a == b or a.is_relative_to(b)

    done: list[tuple[Path, Path, str]] = []
    for path, what in outputs:
        r = real(path)
        for other, o, its in done:
            if overlap(r, o) or overlap(o, r):
                raise CatDogError(f"{its} {other} and {what} {path} are the same file: one would overwrite the other; "
                                  f"give another name")
        done.append((path, r, what))
        for other, its in inputs.items():
            if overlap(r, real(other)):
                raise CatDogError(f"{what} {path} would overwrite {its} {other}, which this run reads: give another "
                                  f"name")


# State kept as data, never as code (a pickle runs code when read): nested values to_plain turns into JSON's, and
# from_plain (json.loads' object_hook) turns back; datetimes are tagged objects.
_DATETIME = "$datetime"


def to_plain(obj):
    """`obj` (dicts with string keys, lists, tuples, numbers, numpy values, datetimes) as JSON values; anything
    else raises TypeError (it could not be read back)."""
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"a key that is not a string in {sorted(map(repr, obj))[:3]}")
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, datetime.datetime):
        return {_DATETIME: obj.isoformat()}
    if isinstance(obj, np.ndarray):
        return to_plain(obj.tolist())
    if isinstance(obj, (np.bool_, np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    raise TypeError(f"a {type(obj).__name__}")


def from_plain(obj: dict):
    """json.loads' object_hook for to_plain's JSON: tagged datetimes back to datetimes."""
    return datetime.datetime.fromisoformat(obj[_DATETIME]) if set(obj) == {_DATETIME} else obj


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


def plain_name(name: str, where: str, fix: str) -> str:
    """`name` if it is a plain file name; a CatDogError naming `where` (the file and line it was read from) if it is
    a path (a folder in it, `..`, absolute): a name read from a file never leads out of the folder it belongs to."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise CatDogError(f"{where}: {name!r} is a path, not a file name: {fix}")
    return name


@contextlib.contextmanager
def exclusive_lock(path: str | Path, holder: str) -> Iterator[None]:
    """Hold the lock file `path` (an exclusive fcntl.flock) for the block, or refuse at once, naming the process
    that holds it. The kernel drops a flock when its process dies, so a killed run never blocks the next one; the
    file is removed on exit, while still held, so no stale file stays behind. `holder` names this run (`01`)."""
    import fcntl

    path = Path(path)
    while True:
        try:  # O_NOFOLLOW: a symlink put in its place never makes the lock write elsewhere
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise CatDogError(f"cannot create the lock file {path} ({e.strerror}): {holder} needs a writable "
                              f"{path.parent}/") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 200).decode(errors="replace").split(maxsplit=1)
            os.close(fd)
            pid, who = other[0] if other else "unknown", other[1].strip() if len(other) > 1 else holder
            raise CatDogError(f"another {who} is running on {path.parent} (pid {pid}): wait until it has "
                              f"finished, then rerun (two at once would mix their files)") from None
        # The run before may have removed the file between our open and our lock: hold the one at `path` now.
        with contextlib.suppress(FileNotFoundError):
            now, held = os.stat(path, follow_symlinks=False), os.fstat(fd)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {holder}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # before the release: a process waiting on this file then takes a new one
        os.close(fd)
