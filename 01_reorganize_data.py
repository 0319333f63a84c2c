"""Step 1: check the Kaggle images and lay them out for the later steps.

data/train, data/test (or train.zip, test.zip) are read, never changed. Output:
  data/train2/{cat,dog}/                 every usable labelled image (feature extraction)
  data/splitted/{train,valid}/{cat,dog}/ the seeded, stratified split (augmentation, fine-tuning)
  data/test2/test/                       the test images
  data/split.csv                         filename,label,subset: the one split every step uses
  data/eda/                              image-size statistics and plots
Entries are symbolic links unless --copy. A rerun with the same settings changes nothing.
"""

import hashlib
import json
import os
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

import helper
from helper import CLASSES, CatDogError, log

CHECK_CACHE = "file_check.csv"
DERIVED = (helper.TRAIN2, helper.SPLITTED, str(helper.TEST2.parent))


def parse_args(argv=None):
    p = helper.base_parser(__doc__.splitlines()[0])
    p.add_argument("--valid-frac", type=float, default=0.2, help="share of each class held out for validation")
    p.add_argument("--exclude", metavar="FILE", help="training images to leave out, one name per line "
                   "(data/exclude_report.txt lists the report's mislabeled and non-pet images)")
    p.add_argument("--copy", action="store_true", help="copy files instead of symbolic links")
    p.add_argument("--demo", type=int, metavar="N", help="first generate a demo dataset of N images per class")
    p.add_argument("--workers", type=int, default=8, help="threads that check images")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- input

def ensure_folder(data: Path, sub: str) -> Path:
    """data/<sub>, extracted from data/<sub>.zip when only the zip is there."""
    folder, archive = data / sub, data / f"{sub}.zip"
    if folder.is_dir():
        return folder
    if not archive.is_file():
        raise CatDogError(f"neither {folder}/ nor {archive} found: download train.zip and test.zip of "
                          f"dogs-vs-cats-redux-kernels-edition from Kaggle into {data}/ (or use --demo N)")
    tmp = data / f".{sub}.extracting"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as z:
            for member in tqdm(z.infolist(), desc=f"extracting {archive.name}", unit="file"):
                z.extract(member, tmp)
    except zipfile.BadZipFile as e:
        raise CatDogError(f"{archive}: not a valid zip ({e}); download it again") from e
    inner = tmp / sub
    os.replace(inner if inner.is_dir() else tmp, folder)  # Kaggle's zips hold a top folder named like the zip
    shutil.rmtree(tmp, ignore_errors=True)
    log.info(f"extracted {archive} to {folder}/")
    return folder


def check_folder(folder: Path, parse, cache: pd.DataFrame, workers: int) -> pd.DataFrame:
    """One row per entry of `folder`: name, size on disk, image header facts and the problem, if any.

    Images whose size and mtime match the cache are not decoded again, so reruns are quick.
    """
    cached = {(r.name, r.bytes, r.mtime_ns): r for r in cache.itertuples(index=False)
              if r.folder == folder.name} if len(cache) else {}
    entries = sorted(os.scandir(folder), key=lambda e: e.name)

    def check(entry) -> dict:
        row = {"folder": folder.name, "name": entry.name}
        if not entry.is_file():
            return {**row, "problem": "not a regular file"}
        st = entry.stat()
        row.update(bytes=st.st_size, mtime_ns=st.st_mtime_ns)
        hit = cached.get((entry.name, st.st_size, st.st_mtime_ns))
        if hit is not None:
            return hit._asdict()
        if parse(entry.name) is None:
            return {**row, "problem": "name does not match Kaggle's pattern "
                                      + ("cat.N.jpg / dog.N.jpg" if folder.name == "train" else "N.jpg")}
        return {**row, **helper.check_image(entry.path)}

    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        rows = list(tqdm(pool.map(check, entries), total=len(entries), desc=f"checking {folder.name}/",
                         unit="img", disable=len(entries) < 500))
    df = pd.DataFrame(rows, columns=["folder", "name", "bytes", "mtime_ns", "width", "height",
                                     "format", "mode", "problem", "note"])
    df[["problem", "note"]] = df[["problem", "note"]].fillna("")
    return df


# ----------------------------------------------------------------------------- layout

def planned_entries(data: Path, split: pd.DataFrame, test_names: list[str]) -> dict[str, Path]:
    """Every derived entry (relative path under data/) -> the original it stands for."""
    plan = {}
    for name, label, subset in split.itertuples(index=False):
        src = data / "train" / name
        plan[f"{helper.TRAIN2}/{CLASSES[label]}/{name}"] = src
        plan[f"{helper.SPLITTED}/{subset}/{CLASSES[label]}/{name}"] = src
    for name in test_names:
        plan[f"{helper.TEST2}/{name}"] = data / "test" / name
    return plan


def layout_matches(data: Path, plan: dict[str, Path], copy: bool) -> bool:
    """True when the derived folders hold exactly the planned entries, of the right kind."""
    found = set()
    for top in DERIVED:
        for root, _, files in os.walk(data / top):
            found.update(os.path.relpath(os.path.join(root, f), data) for f in files)
    if found != set(plan):
        return False
    return all((data / rel).is_symlink() != copy for rel in plan)


def build_layout(data: Path, plan: dict[str, Path], copy: bool) -> None:
    """Build the derived folders beside the old ones, then swap them in: no stale entry survives."""
    tmp = data / ".reorganize.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, src in tqdm(plan.items(), desc="linking" if not copy else "copying", unit="file",
                         disable=len(plan) < 2000):
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if copy:
            shutil.copy2(src, dst)
        else:  # relative to the final place, so the data folder can move as a whole
            os.symlink(os.path.relpath(src, (data / rel).parent), dst)
    for top in DERIVED:
        old = data / f".{top}.old"
        if (data / top).exists():
            os.replace(data / top, old)
        if (tmp / top).exists():
            os.replace(tmp / top, data / top)
        shutil.rmtree(old, ignore_errors=True)  # removes links only; the originals are untouched
    shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- EDA

def write_eda(data: Path, checks: pd.DataFrame) -> None:
    """The report's size scatter (with and without the >1000 px outliers) and aspect-ratio histogram."""
    plt = helper.pyplot()
    eda = data / "eda"
    sizes = checks[["name", "width", "height"]].copy()
    sizes["aspect"] = sizes.width / sizes.height
    helper.write_csv(sizes, eda / "sizes.csv")
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    small = sizes[(sizes.width <= 1000) & (sizes.height <= 1000)]
    for ax, df, title in [(axes[0], sizes, "all training images"),
                          (axes[1], small, f"without the {len(sizes) - len(small)} over 1000 px")]:
        ax.scatter(df.width, df.height, s=2, alpha=0.3)
        ax.set(xlabel="width (px)", ylabel="height (px)", title=title)
    helper.save_figure(fig, eda / "sizes.png")
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.hist(sizes.aspect.clip(0, 3), bins=60)
    ax.set(xlabel="aspect ratio (width / height)", ylabel="images", title="aspect ratios")
    helper.save_figure(fig, eda / "aspect.png")


# ----------------------------------------------------------------------------- main

def report_problems(checks: pd.DataFrame) -> None:
    for r in checks[checks.problem != ""].itertuples():
        log.warning(f"skipped {r.folder}/{r.name}: {r.problem}")
    for r in checks[(checks.problem == "") & (checks.note != "")].itertuples():
        log.info(f"kept    {r.folder}/{r.name}: {r.note}")


def main(args):
    data = Path(args.data_dir)
    if args.demo:
        helper.make_demo_dataset(data, args.demo, args.seed)
    folders = {sub: ensure_folder(data, sub) for sub in ("train", "test")}

    cache_path = data / CHECK_CACHE
    cache = pd.read_csv(cache_path, keep_default_na=False) if cache_path.is_file() else pd.DataFrame()
    checks = {sub: check_folder(folders[sub], parse, cache, args.workers)
              for sub, parse in (("train", helper.parse_train_name), ("test", helper.parse_test_name))}
    helper.write_csv(pd.concat(checks.values()), cache_path)
    report_problems(pd.concat(checks.values()))

    train_ok = checks["train"][checks["train"].problem == ""]
    excluded = set()
    if args.exclude:
        wanted = set(helper.read_name_list(args.exclude))
        excluded = wanted & set(train_ok.name)
        for name in sorted(wanted - excluded):
            log.warning(f"--exclude {args.exclude}: {name} is not among the usable training images")
    train_ok = train_ok[~train_ok.name.isin(excluded)]
    test_ok = checks["test"][checks["test"].problem == ""]
    if train_ok.empty or test_ok.empty:
        which = folders["train"] if train_ok.empty else folders["test"]
        raise CatDogError(f"no usable images in {which}/ (see the messages above)")

    parsed = [helper.parse_train_name(n) for n in train_ok.name]
    order = sorted(range(len(parsed)), key=lambda i: parsed[i])  # by label, then numeric id
    split = pd.DataFrame({"filename": train_ok.name.to_numpy()[order],
                          "label": [parsed[i][0] for i in order]})
    split["subset"] = np.where(helper.stratified_split(split.label, args.valid_frac, args.seed), "valid", "train")
    test_names = sorted(test_ok.name, key=helper.parse_test_name)

    split_text = split.to_csv(index=False)
    meta = {"seed": args.seed, "valid_frac": args.valid_frac, "copy": args.copy, "excluded": sorted(excluded),
            "split_sha256": hashlib.sha256(split_text.encode()).hexdigest(),
            "test_sha256": hashlib.sha256("\n".join(test_names).encode()).hexdigest()}
    meta_path = data / helper.SPLIT_META
    plan = planned_entries(data, split, test_names)
    old_meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if old_meta == meta and (data / helper.SPLIT_CSV).is_file() and layout_matches(data, plan, args.copy):
        log.info(f"{data}/ is already organized with these settings: nothing changed")
    else:
        build_layout(data, plan, args.copy)
        helper.write_csv(split, data / helper.SPLIT_CSV)
        helper.write_json(meta, meta_path)
        log.info(f"wrote {helper.TRAIN2}/, {helper.SPLITTED}/, {helper.TEST2}/ "
                 f"({'copies' if args.copy else 'links'}) and {helper.SPLIT_CSV} under {data}/")
    if old_meta != meta or not (data / "eda" / "sizes.png").is_file():
        write_eda(data, train_ok)

    counts = split.groupby(["subset", "label"]).size()
    n_bad = {sub: int((c.problem != "").sum()) for sub, c in checks.items()}
    log.info(f"labelled: {len(split)} used (cat {int((split.label == 0).sum())}, dog {int(split.label.sum())}), "
             f"{n_bad['train']} skipped, {len(excluded)} excluded")
    for subset in ("train", "valid"):
        log.info(f"  {subset}: cat {counts.get((subset, 0), 0)}, dog {counts.get((subset, 1), 0)}")
    log.info(f"test: {len(test_names)} used, {n_bad['test']} skipped; split seed {args.seed}, "
             f"valid fraction {args.valid_frac}")
    return {"split": split, "test_names": test_names, "checks": checks, "excluded": excluded}


if __name__ == "__main__":
    helper.run_cli(main, parse_args())
