"""Duplicate images: exact duplicates (the same decoded pixels, whatever the bytes) and near duplicates (the same
photo re-encoded or resized), within and across the labelled and the test images, grouped with union-find.

01 hashes each image in the pass that decodes it anyway (image_hashes, cached with its checks) and writes the
groups to data/duplicates.csv (group, file, part, label, pixels); the split and the K-folds keep each group on one
side (data.group_ids); 07 --known-labels reads the exact duplicates of labelled images among the test images.

Near duplicates: a 64-bit pHash (the signs, against their median, of the 8x8 lowest frequencies of the DCT of a
32x32 grayscale thumbnail) within NEAR_BITS (10) bits, and the mean colour within NEAR_COLOUR (3) levels per channel.
Measured: 600 re-encoded (JPEG quality 50-90) or resized (to 50-80%) copies of 100 demo images stay within 14 bits
and 2 levels, 4 of them (the harshest) over 10 bits, so those are missed; the 60 copies planted among 37,520
generated photos (byte copies, re-encodings at quality 60, 75% resizes) are within 4 bits and 2 levels. False
pairs: among 79,800 pairs of different demo images (flat, noisy backgrounds: a hard case for a perceptual hash),
pHash alone pairs 251 at 14 bits, with the colour check none; among the 703 million pairs of the 37,520 generated
photos (smooth random fields: another hard case) none at 10 bits and 3 levels, 2 at 10 and 4, 136 at 14 and 4.
tests/test_duplicates.py checks both sides of the threshold; docs/data.md has the timing.

Used by: 01 (hashes, groups, duplicates.csv), data.py's split and folds (through group ids), 03/05 (folds), 07.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .common import CLASSES, DUPLICATE_SUSPECTS, DUPLICATES_CSV, CatDogError

DUPLICATE_COLUMNS = ("group", "file", "part", "label", "pixels")
NEAR_BITS = 10     # pHash Hamming distance of a near duplicate, at most
NEAR_COLOUR = 3    # and the largest difference of the mean colour's channels (0-255), at most
HASH_SIZE = 32     # the thumbnail's side: its 8x8 lowest DCT frequencies make the 64-bit pHash
# The DCT-II basis: row u of the matrix holds cos(pi u (2x + 1) / 2N), so D @ g @ D.T is g's 2-D DCT (unscaled:
# only signs against the median count).
_DCT = np.cos(np.pi * np.outer(np.arange(HASH_SIZE), 2 * np.arange(HASH_SIZE) + 1) / (2 * HASH_SIZE))


def image_hashes(im) -> dict[str, str]:
    """The hashes of a decoded PIL image, as the pipeline sees it (RGB): `phash` (64 bits, hex), `colour` (mean RGB,
    hex) and `pixels`, equal for byte-different files of equal pixels: a digest of the size, the pHash, the colour and
    the CRC-32 of every pixel (CRC-32, not a cryptographic hash, because it is 2-3 times faster on 37,500 photos;
    two different images share `pixels` only if they also share size, pHash and colour and then collide in the
    CRC, 1 in 4 billion)."""
    from PIL import Image

    rgb = im if im.mode == "RGB" else im.convert("RGB")
    # reducing_gap: Pillow first reduces by whole blocks (fast), then box-filters the rest.
    thumb = np.asarray(rgb.resize((HASH_SIZE, HASH_SIZE), Image.Resampling.BOX, reducing_gap=2.0), dtype=np.float64)
    gray = thumb @ np.array([0.299, 0.587, 0.114])
    freq = (_DCT @ gray @ _DCT.T)[:8, :8].ravel()
    bits = freq > np.median(freq[1:])  # without the DC term, which only says how bright the image is
    phash = np.packbits(bits).tobytes().hex()
    colour = np.clip(np.round(thumb.reshape(-1, 3).mean(0)), 0, 255).astype(np.uint8).tobytes().hex()
    key = f"{rgb.width}x{rgb.height}:{phash}:{colour}:{zlib.crc32(rgb.tobytes()):08x}"
    return {"pixels": hashlib.blake2b(key.encode(), digest_size=8).hexdigest(), "phash": phash, "colour": colour}


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)  # the smaller index roots the group: groups come out in row order


def near_pairs(phash: Sequence[str], colour: Sequence[str], bits: int = NEAR_BITS, levels: int = NEAR_COLOUR,
               chunk: int = 256) -> np.ndarray:
    """(i, j) with i < j of every pair of images within `bits` pHash bits and `levels` of mean colour. Sorted by
    red, each chunk of images is compared only with those whose red is within `levels` (numpy's popcount on the
    XOR of the hashes): for 37,500 photos a tenth or less of the 703 million pairs."""
    n = len(phash)
    if n < 2:
        return np.zeros((0, 2), np.int64)
    h = np.array([int(x, 16) for x in phash], dtype=np.uint64)
    c = np.frombuffer(bytes.fromhex("".join(colour)), dtype=np.uint8).reshape(n, 3).astype(np.int16)
    order = np.argsort(c[:, 0], kind="stable")
    h, c, red = h[order], c[order], c[order, 0]
    found = []
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        hi = int(np.searchsorted(red, red[end - 1] + levels, side="right"))
        # Columns from `start`: a pair with an earlier image was found in that image's chunk, whose window reaches.
        close = np.bitwise_count(h[start:end, None] ^ h[None, start:hi]) <= bits
        i, j = np.nonzero(close)
        i, j = i + start, j + start
        keep = (i < j) & (np.abs(c[i] - c[j]).max(axis=1) <= levels)
        found.append(np.column_stack([order[i[keep]], order[j[keep]]]))
    pairs = np.sort(np.concatenate(found), axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def find_groups(table: pd.DataFrame, bits: int = NEAR_BITS, levels: int = NEAR_COLOUR) -> pd.DataFrame:
    """duplicates.csv's rows for `table` (file, part, label, pixels, phash, colour; label -1 for test images):
    every image in a group of two or more (equal pixels, or near by pHash and colour, transitively), in groups
    numbered from 1 in the order of their first row, rows in table order."""
    table = table.reset_index(drop=True)
    uf = _UnionFind(len(table))
    first = {}
    for i, p in enumerate(table.pixels):
        uf.union(first.setdefault(p, i), i)
    for i, j in near_pairs(table.phash.tolist(), table.colour.tolist(), bits, levels):
        uf.union(int(i), int(j))
    root = np.array([uf.find(i) for i in range(len(table))])
    sizes = np.bincount(root, minlength=len(table))
    grouped = sizes[root] > 1
    numbers = {r: k for k, r in enumerate(dict.fromkeys(root[grouped]), start=1)}
    out = table.loc[grouped, ["file", "part", "label", "pixels"]].copy()
    out.insert(0, "group", [numbers[r] for r in root[grouped]])
    labels = out.label.astype(int)
    out["label"] = [CLASSES[v] if v >= 0 else "" for v in labels]
    return out.sort_values("group", kind="stable").reset_index(drop=True)[list(DUPLICATE_COLUMNS)]


def duplicate_summary(groups: pd.DataFrame, test_part: str = "test") -> dict[str, int]:
    """groups, images in them, groups holding a test and a labelled image, and groups holding a cat and a dog."""
    if groups.empty:
        return {"groups": 0, "images": 0, "cross": 0, "mixed": 0}
    by = groups.groupby("group")
    cross = sum((s == test_part).any() and (s != test_part).any() for _, s in by.part)
    mixed = sum({"cat", "dog"} <= set(s) for _, s in by.label)
    return {"groups": int(by.ngroups), "images": len(groups), "cross": int(cross), "mixed": int(mixed)}


def read_duplicates(data_dir: str | Path) -> pd.DataFrame | None:
    """data/duplicates.csv as 01 wrote it; None when there is none (an older 01's data dir)."""
    path = Path(data_dir) / DUPLICATES_CSV
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path, dtype={"group": int, "file": str, "part": str, "label": str, "pixels": str},
                         keep_default_na=False)
    except ValueError:
        df = None
    if df is None or tuple(df.columns) != DUPLICATE_COLUMNS:
        raise CatDogError(f"{path} is not a duplicates file made by 01_reorganize_data.py: rerun 01")
    return df


def group_ids(files: Sequence[str], groups: pd.DataFrame | None, part: str | None = None) -> np.ndarray | None:
    """Each row's duplicate group among `files` (labelled rows, by split.csv's name; `part` limits the groups'
    rows to one part), -1 for a row in none; None when no two rows share a group (the plain split and folds)."""
    if groups is None or groups.empty:
        return None
    rows = groups if part is None else groups[groups.part == part]
    of = dict(zip(rows.file, rows.group, strict=True))
    ids = np.array([of.get(f, -1) for f in files], dtype=np.int64)
    counts = pd.Series(ids[ids >= 0]).value_counts()
    return ids if (counts > 1).any() else None


def known_test_labels(groups: pd.DataFrame | None, labelled: dict[str, int], test_part: str = "test"
                      ) -> tuple[dict[str, int], list[str]]:
    """Test file -> the label of the labelled images (`labelled`: split.csv's file -> label) with exactly its
    decoded pixels; never from a near duplicate. Also the test files whose exact copies disagree (cat and dog)."""
    if groups is None:
        return {}, []
    known, conflicts = {}, []
    exact = groups[groups.part != test_part]
    by_pixels: dict[str, set[int]] = {}
    for f, p in zip(exact.file, exact.pixels, strict=True):
        if f in labelled:
            by_pixels.setdefault(p, set()).add(labelled[f])
    for f, p in zip(groups.file[groups.part == test_part], groups.pixels[groups.part == test_part], strict=True):
        labels = by_pixels.get(p)
        if labels and len(labels) == 1:
            known[f] = next(iter(labels))
        elif labels:
            conflicts.append(f)
    return known, conflicts


def hash_rows(checks: pd.DataFrame, part: str, labels: Sequence[int]) -> pd.DataFrame:
    """find_groups' input for the checked images `checks` (01's check rows: name and hashes) of one part."""
    return pd.DataFrame({"file": checks.name.to_numpy(), "part": part, "label": np.asarray(labels, dtype=np.int64),
                         "pixels": checks.pixels.to_numpy(), "phash": checks.phash.to_numpy(),
                         "colour": checks.colour.to_numpy()})


def suspect_lines(groups: pd.DataFrame) -> str:
    """The labelled images of groups holding a cat and a dog, in 01 --exclude's form ('' when none)."""
    mixed = {g for g, s in groups.groupby("group").label if {"cat", "dog"} <= set(s)}
    rows = groups[groups.group.isin(mixed) & (groups.label != "")]
    if rows.empty:
        return ""
    lines = ["# Images of duplicate groups holding a cat and a dog (01_reorganize_data.py, data/duplicates.csv): one",
             "# of each group is mislabelled. Look at them; delete the lines of correctly labelled images, then",
             "# leave the rest out with 01_reorganize_data.py --exclude THIS_FILE."]
    lines += [f"{r.file}  # group {r.group}, {r.label}" for r in rows.itertuples()]
    return "\n".join(lines) + "\n"


def save_groups(data_dir: str | Path, groups: pd.DataFrame) -> str:
    """Write data/duplicates.csv, and data/duplicates_suspects.txt when a group holds a cat and a dog, each only
    when its content changed (a rerun changes nothing on disk); returns the one-line summary."""
    from .files import atomic_path, write_csv
    data_dir = Path(data_dir)
    path, suspects = data_dir / DUPLICATES_CSV, data_dir / DUPLICATE_SUSPECTS
    if not (path.is_file() and path.read_bytes() == groups.to_csv(index=False).encode()):
        write_csv(groups, path)
    lines = suspect_lines(groups)
    if lines and not (suspects.is_file() and suspects.read_text() == lines):
        with atomic_path(suspects) as tmp:
            tmp.write_text(lines)
    s = duplicate_summary(groups)
    return (f"duplicates: {s['groups']} groups of {s['images']} images in {path}, {s['cross']} across train and "
            f"test, {s['mixed']} holding a cat and a dog" + (f" (listed in {suspects}: review them)" if s["mixed"]
                                                              else ""))


def fold_groups(data_dir: str | Path, enabled: bool = True) -> np.ndarray | None:
    """03/05 --folds' duplicate groups of split.csv's rows: those of data/duplicates.csv when 01 grouped its split
    (split.json's group_duplicates: the folds follow 01's choice) and `enabled` (not --no-group-duplicates)."""
    from .common import SPLIT_META
    from .data import read_split
    from .files import read_json
    meta = read_json(Path(data_dir) / SPLIT_META) or {}
    if not enabled or not meta.get("group_duplicates"):
        return None
    return group_ids(read_split(data_dir).filename, read_duplicates(data_dir))
