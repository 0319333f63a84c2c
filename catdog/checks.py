"""The image checks of step 1: what each image is (size, format, mode), whether the pipeline can use it (the
problem that skips it, by name), the hashes the duplicate finder groups, and the cache that spares a rerun the
decoding.

Used by: 01 (every image of train/, test/ and --extra-data), tests.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from .common import CatDogError, log, progress
from .data import test_name_problem
from .duplicates import image_hashes

CHECK_CACHE = "file_check.csv"
# Every row holds every number (0 where it does not apply), so the cache reads back with the types it was
# written with and its keys match a fresh stat().
CHECK_COLUMNS = {"folder": str, "name": str, "bytes": "int64", "mtime_ns": "int64", "width": "int64",
                 "height": "int64", "format": str, "mode": str, "problem": str, "note": str,
                 "pixels": str, "phash": str, "colour": str}  # the last three: helper.image_hashes
# Filled in before a row becomes a table: a missing number would turn its column into floats, which round
# nanosecond mtimes and so miss the cache on every run.
NO_FACTS = {column: "" if kind is str else 0 for column, kind in CHECK_COLUMNS.items()}
DECODABLE = ("JPEG", "PNG", "GIF")  # what tf.io.decode_jpeg reads


def check_image(path: str | Path) -> dict:
    """Header size, format and mode of an image, and `problem` (empty when usable).

    The size comes from the header; the full decode is what catches truncated files.
    Grayscale, CMYK and PNG content are usable: the pipeline converts them to RGB.
    Whatever goes wrong with one image is that image's problem: it is skipped by name, never a traceback.
    """
    from PIL import Image, UnidentifiedImageError

    info = {"width": 0, "height": 0, "format": "", "mode": "", "problem": "", "note": "", "pixels": "", "phash": "",
            "colour": ""}
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            info["problem"] = "empty file (0 bytes)"
            return info
        with Image.open(path) as im:
            info.update(width=im.width, height=im.height, format=im.format or "", mode=im.mode)
            im.load()
            if info["format"] in DECODABLE:  # hashed in the decode the check makes anyway: duplicates cost little
                info.update(image_hashes(im))
    except UnidentifiedImageError:
        info["problem"] = "not an image (no known image format)"
    # Neither is an OSError; the warning is an error under `python -W error`.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        info["problem"] = f"too many pixels to decode safely, a possible decompression bomb ({e})"
    except PermissionError as e:
        info["problem"] = f"unreadable ({e.strerror})"
    except (OSError, SyntaxError, ValueError) as e:
        info["problem"] = f"corrupt or truncated image ({e})"
    except Exception as e:  # a Pillow plugin's own (struct.error, IndexError, MemoryError...)
        info["problem"] = f"cannot be decoded ({type(e).__name__}: {e})"
    if not info["problem"] and info["format"] not in DECODABLE:
        info["problem"] = f"{info['format']} content: the pipeline decodes only JPEG, PNG and GIF"
    if not info["problem"]:
        notes = []
        if info["format"] != "JPEG":
            notes.append(f"{info['format']} content in a .jpg file")
        if info["mode"] != "RGB":
            notes.append(f"mode {info['mode']}")
        info["note"] = ", ".join(notes) + (", decoded as RGB" if notes else "")
    return info


def read_check_cache(path: Path) -> pd.DataFrame:
    """The checks of an earlier run; empty when there are none or the file is not one this step wrote."""
    empty = pd.DataFrame(columns=list(CHECK_COLUMNS)).astype(CHECK_COLUMNS)
    if not path.is_file():
        return empty
    try:
        cache = pd.read_csv(path, dtype=CHECK_COLUMNS, keep_default_na=False)  # an image may be named NA
    except ValueError:  # empty, garbled, not UTF-8, or text where a number belongs
        cache = None
    if cache is None or list(cache.columns) != list(CHECK_COLUMNS):
        log.warning(f"{path} is not a check cache written by this step: checking every image again")
        return empty
    return cache


def check_folder(folder: Path, parse, cache: pd.DataFrame, workers: int, key: str | None = None,
                 pattern: str = "") -> pd.DataFrame:
    """One row per entry of `folder`: name, size on disk, image header facts and the problem, if any (a name that
    `parse` refuses: not `pattern`).

    Images whose size and mtime match the cache are not decoded again, so reruns are quick. `key` (default:
    the folder's name) files them in the cache and names them in messages.
    """
    key = key or folder.name
    cached = {(r.name, r.bytes, r.mtime_ns): r._asdict()
              for r in cache[cache.folder == key].itertuples(index=False)}
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise CatDogError(f"cannot list {folder}/ ({e.strerror}): check that it is a readable folder") from e

    def check(entry) -> dict:
        row = {**NO_FACTS, "folder": key, "name": entry.name}
        try:
            if not entry.is_file():
                return {**row, "problem": "not a regular file"}
            st = entry.stat()
        except OSError as e:  # a symbolic link loop, or a link to itself
            return {**row, "problem": f"unreadable ({e.strerror})"}
        row.update(bytes=st.st_size, mtime_ns=st.st_mtime_ns)
        hit = cached.get((entry.name, st.st_size, st.st_mtime_ns))
        if hit is not None:
            return hit
        if parse(entry.name) is None:
            return {**row, "problem": test_name_problem(entry.name) if key == "test"
                    else f"name does not match {pattern}"}
        info = check_image(entry.path)
        if key == "test" and not info["problem"] and entry.name != f"{parse(entry.name)}.jpg":
            info["note"] = ", ".join(filter(None, [f"not Kaggle's name for test id {parse(entry.name)}", info["note"]]))
        return {**row, **info}

    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        rows = list(progress(pool.map(check, entries), f"checking {key}/", unit="img", total=len(entries),
                                    disable=len(entries) < 500, leave=True))
    return pd.DataFrame(rows, columns=list(CHECK_COLUMNS)).astype(CHECK_COLUMNS)
