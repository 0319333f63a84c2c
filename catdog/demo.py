"""The demo data: generated photos in Kaggle's layout (train/{cat,dog}.N.jpg, test/N.jpg) that random-weight CNN
features can tell apart, so the whole pipeline runs without Kaggle's data or any download.

Used by: 01 --demo (and so `make demo` and the tests' pipeline), benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .common import CLASSES, DEFAULT_SEED, CatDogError, log
from .files import atomic_path, read_json, write_csv, write_json

DEMO_MARKER = ".demo.json"
# From this many images per class the demo adds its two duplicates (the tests' pipeline uses 30, `make demo` 50);
# the smaller demos are the tests' minimal datasets, whose counts the tests name.
DEMO_DUPLICATES_FROM = 25


def demo_image(rng: np.random.Generator, label: int, width: int, height: int):
    """A noisy photo-like image: warm background and ellipses for cats, cool and boxes for dogs.

    The colour and shape differ enough that even random-weight CNN features separate the
    classes, while noise and overlap keep it from being trivially perfect.
    """
    from PIL import Image, ImageDraw

    base = np.array([190, 120, 70] if label == 0 else [80, 120, 190], dtype=float)
    colour = np.clip(base + rng.normal(0, 35, 3), 0, 255)
    img = np.clip(colour + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(img)
    draw = ImageDraw.Draw(im)
    for _ in range(rng.integers(1, 4)):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        x1, y1 = x0 + rng.integers(width // 6, width // 2), y0 + rng.integers(height // 6, height // 2)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if label == 0 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    return im


def demo_size(rng: np.random.Generator) -> tuple[int, int]:
    """Width and height like Kaggle's photos: at most 500 px, aspect mostly 1:2 to 2:1, often 4:3."""
    long_side = int(rng.integers(250, 501))
    aspect = float(rng.choice([4 / 3, 3 / 4, 1.0, rng.uniform(0.5, 2.0)]))
    w, h = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
    return int(w), int(h)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def not_generated(data_dir: Path, generated: dict[str, str]) -> str | None:
    """The first entry under train/ or test/ that the demo did not write, or that changed since; None if none."""
    for sub in ("train", "test"):
        folder = data_dir / sub
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            return sub
        if not folder.is_dir():
            continue
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            rel = f"{sub}/{entry.name}"
            # Checked by content too: a user's photo copied over a generated name is the user's.
            if (rel not in generated or not entry.is_file(follow_symlinks=False)
                    or sha256(Path(entry.path)) != generated[rel]):
                return rel
    return None


def refuse_real_data(data_dir: Path, generated: dict[str, str]) -> None:
    """--demo never shadows the user's own data: Kaggle's zips (01 would use the demo's train/ and test/ instead),
    or, with no demo made here yet, images of the user's in train/ or test/."""
    zips = [name for name in ("train.zip", "test.zip") if (data_dir / name).exists()]
    if zips:
        raise CatDogError(f"{data_dir} holds {' and '.join(zips)} (Kaggle's data): --demo would write train/ and "
                          "test/ beside them, which 01 then uses instead of the zips; run 01 without --demo to use "
                          "them, or give --demo an empty --data-dir")
    for sub in ("train", "test") if not generated else ():
        entries = sorted(os.listdir(data_dir / sub)) if (data_dir / sub).is_dir() else []
        if entries:
            raise CatDogError(f"{data_dir / sub / entries[0]} is not demo data: {data_dir / sub}/ holds {len(entries)} "
                              "entries --demo did not write, so it holds your own (Kaggle's?) images; run 01 without "
                              "--demo to use them, or give --demo an empty --data-dir")


def generated_files(marker: Path) -> dict[str, str]:
    """The files .demo.json says --demo wrote: each a name directly in train/ or test/, where --demo writes, so
    replacing them never removes anything elsewhere."""
    old = read_json(marker) or {}
    generated = old.get("files") if isinstance(old.get("files"), dict) else {}
    for rel in generated:
        sub, _, name = str(rel).partition("/")
        if sub not in ("train", "test") or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            line = next((i for i, text in enumerate(marker.read_text().splitlines(), start=1)
                         if text.lstrip().startswith(json.dumps(rel))), "?")
            raise CatDogError(f"{marker}, line {line}: {rel!r} is not a file in train/ or test/, where --demo "
                              f"writes: {marker.name} was not written by --demo (or was edited), nothing was removed; "
                              "give --demo an empty --data-dir")
    return generated


def make_demo_dataset(data_dir: str | Path, n_per_class: int, seed: int = DEFAULT_SEED) -> Path:
    """Write a demo dataset in Kaggle's layout: train/{cat,dog}.N.jpg, test/N.jpg, plus test truth.

    Quirks of the real data are included: cat.0 is over 1000 px wide, dog.1 is grayscale, and from
    DEMO_DUPLICATES_FROM images per class two duplicates, made after every other image so that those stay as they
    were: the last test image is a byte copy of the last cat, and dog.N (N = n_per_class) a re-encoding (JPEG
    quality 60) of dog.N-1, as Kaggle's sets hold both.
    `demo_test_labels.csv` keeps the test labels so a demo submission can be scored. The marker
    .demo.json records every file written and its sha256: a later --demo N replaces those and refuses to
    run if train/ or test/ hold anything else, so it can never delete the user's images.
    """
    if n_per_class < 2:
        raise CatDogError("--demo needs at least 2 images per class")
    data_dir = Path(data_dir)
    marker = data_dir / DEMO_MARKER
    spec = {"n_per_class": n_per_class, "seed": seed}
    generated = generated_files(marker)
    refuse_real_data(data_dir, generated)
    old = read_json(marker) or {}
    if {k: old.get(k) for k in spec} == spec and all((data_dir / r).is_file() for r in generated):
        log.info(f"demo data in {data_dir} already made with {spec}: kept")
        return data_dir
    stray = not_generated(data_dir, generated)
    if stray:
        raise CatDogError(f"{data_dir / stray} is not demo data (--demo did not write it, or it changed since): "
                          "--demo replaces only the files it wrote; use an empty --data-dir for --demo")
    for rel in generated:
        (data_dir / rel).unlink(missing_ok=True)
    files = {}

    def save(im, rel: str) -> None:
        with atomic_path(data_dir / rel) as tmp:
            im.save(tmp, format="JPEG", quality=85)
        files[rel] = sha256(data_dir / rel)
        # Kept current (without the settings until the end), so an interrupted run can still be replaced.
        write_json({"files": files}, marker)

    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        for i in range(n_per_class):
            w, h = (1100, 800) if (label, i) == (0, 0) else demo_size(rng)
            im = demo_image(rng, label, w, h)
            save(im.convert("L") if (label, i) == (1, 1) else im, f"train/{name}.{i}.jpg")
    n_test = max(2, n_per_class // 2)
    truth = rng.integers(0, 2, n_test)
    for i, label in enumerate(truth, start=1):
        save(demo_image(rng, int(label), *demo_size(rng)), f"test/{i}.jpg")
    if n_per_class >= DEMO_DUPLICATES_FROM:
        from PIL import Image
        last_cat = data_dir / f"train/cat.{n_per_class - 1}.jpg"
        with atomic_path(data_dir / f"test/{n_test + 1}.jpg") as tmp:
            tmp.write_bytes(last_cat.read_bytes())
        files[f"test/{n_test + 1}.jpg"] = sha256(last_cat)
        with Image.open(data_dir / f"train/dog.{n_per_class - 1}.jpg") as im:
            im.load()
            with atomic_path(data_dir / f"train/dog.{n_per_class}.jpg") as tmp:
                im.save(tmp, format="JPEG", quality=60)
            files[f"train/dog.{n_per_class}.jpg"] = sha256(data_dir / f"train/dog.{n_per_class}.jpg")
        truth = np.append(truth, 0)
        n_test += 1
    write_csv(pd.DataFrame({"id": np.arange(1, n_test + 1), "label": truth}),
                     data_dir / "demo_test_labels.csv")
    write_json({**spec, "files": files}, marker)
    dups = n_per_class >= DEMO_DUPLICATES_FROM
    log.info(f"demo data: {2 * n_per_class + dups} labelled and {n_test} test images written to {data_dir}"
             + (f" (two of them duplicates: test/{n_test}.jpg of train/cat.{n_per_class - 1}.jpg, dog.{n_per_class} "
                f"of dog.{n_per_class - 1})" if dups else ""))
    return data_dir


