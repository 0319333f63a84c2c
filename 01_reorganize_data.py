"""Step 1: check the Kaggle images and lay them out for the later steps.

data/train, data/test (or train.zip, test.zip) are read, never changed. Output:
  data/train2/{cat,dog}/                 every usable labelled image (feature extraction)
  data/splitted/{train,valid}/{cat,dog}/ the seeded, stratified split (augmentation, fine-tuning)
  data/test2/test/                       the test images
  data/split.csv                         filename,label,subset,source: the one split every step uses
  data/duplicates.csv                    group,file,part,label,pixels: exact and near-duplicate images (see
                                         catdog/duplicates.py); the split keeps each group on one side
  data/eda/                              image-size statistics and plots
Entries are symbolic links unless --copy. A rerun with the same settings changes nothing.
--extra-data DIR adds the Oxford-IIIT Pet images to the training rows (never to valid), beside Kaggle's split.
--demo N first writes a generated dataset in Kaggle's layout, to try the pipeline without Kaggle's data.
--download first fetches train.zip and test.zip from Kaggle (needs API credentials), unless already there.
"""

import contextlib
import errno
import filecmp
import hashlib
import os
import re
import shlex
import shutil
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

import helper
from helper import CLASSES, CatDogError, log

DERIVED = (helper.TRAIN2, helper.SPLITTED, str(helper.TEST2.parent))
EXTRA = "oxford-pets"  # split.csv's source, and the folder key in the check cache, of --extra-data's images
EXTRA_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/"
# Oxford-IIIT Pet's names: Breed_N.jpg, cat breeds capitalised (Abyssinian_1.jpg), dog breeds not
# (yorkshire_terrier_5.jpg). Never Kaggle's cat.N.jpg, so the two sources share train2/ without a clash.
EXTRA_NAME = re.compile(r"^([A-Za-z]+(?:_[A-Za-z]+)*)_(\d+)\.jpg$")
# Entries of --extra-data's folder that are images at all; the rest (the dataset's .mat files) is skipped quietly.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp")
NAME_PATTERNS = {"train": "Kaggle's pattern cat.N.jpg / dog.N.jpg", "test": "Kaggle's pattern N.jpg",
                 EXTRA: "Oxford-IIIT Pet's pattern Breed_N.jpg"}


def parse_args(argv=None):
    p = helper.base_parser(__doc__.splitlines()[0])
    p.add_argument("--valid-frac", type=helper.number(float, 0, 1, low_open=True, high_open=True), default=0.2,
                   help="share of each class held out for validation")
    p.add_argument("--exclude", metavar="FILE", help="training images to leave out, one name per line, as "
                   "split.csv names them (data/exclude_report.txt lists the report's mislabeled and non-pet images)")
    p.add_argument("--extra-data", metavar="DIR",
                   help=f"also train on the Oxford-IIIT Pet images (images.tar.gz of {EXTRA_URL}): DIR is the "
                        "unpacked dataset or its images/ folder; they join the train subset only, never valid")
    p.add_argument("--copy", action="store_true", help="copy files instead of symbolic links")
    p.add_argument("--no-group-duplicates", action="store_true",
                   help="split at random row by row, as before duplicates were found: an image and its duplicate "
                        "(data/duplicates.csv) may then land in train and valid (and in two --folds)")
    p.add_argument("--demo", type=helper.number(int, 2), metavar="N",
                   help="first generate a demo dataset of N images per class")
    p.add_argument("--workers", type=helper.POSITIVE_INT, default=8, help="threads that check images")
    p.add_argument("--download", action="store_true",
                   help=f"first download train.zip and test.zip of Kaggle's {helper.KAGGLE_COMPETITION} into "
                        "--data-dir, those not there yet (zip or folder); needs Kaggle API credentials")
    args = p.parse_args(argv)
    if args.download and args.demo:
        p.error("--download and --demo exclude each other: --demo generates its own data; give one of them")
    return args


# ----------------------------------------------------------------------------- image checks, names, split

def parse_extra_name(name: str) -> tuple[int, str, int] | None:
    """`Abyssinian_12.jpg` -> (0, 'Abyssinian', 12), `yorkshire_terrier_5.jpg` -> (1, 'yorkshire_terrier', 5);
    None if not an Oxford-IIIT Pet name. The case of the first letter is the dataset's own cat/dog marker."""
    m = EXTRA_NAME.match(name)
    return (0 if name[0].isupper() else 1, m.group(1), int(m.group(2))) if m else None


# ----------------------------------------------------------------------------- input

def ensure_folder(data: Path, sub: str) -> Path:
    """data/<sub>, extracted from data/<sub>.zip when only the zip is there."""
    folder, archive = data / sub, data / f"{sub}.zip"
    if folder.is_dir():
        if archive.exists():
            log.info(f"using {folder}/, not {archive}: the folder wins and the zip is not extracted again "
                     f"(to use the zip, remove or rename {folder}/)")
        return folder
    if not archive.is_file():
        old = next((p for p in (data / "test1", data / "test1.zip") if sub == "test" and p.exists()), None)
        hint = (f"; {old} is the test set of the original 2013 competition (dogs-vs-cats), not of this one: download "
                f"test.zip of {helper.KAGGLE_COMPETITION} (its ids are the ones Kaggle scores)" + (
                    f", or to use test1/'s images anyway: mv {shlex.quote(str(old))} {shlex.quote(str(folder))}"
                    if old.is_dir() else "")) if old else ""
        raise CatDogError(f"neither {folder}/ nor {archive} found: download train.zip and test.zip of "
                          f"{helper.KAGGLE_COMPETITION} from Kaggle into {data}/ (or use --demo N){hint}")
    helper.remove_stale_temps(data, f".{sub}.extracting.*")
    tmp = helper.temp_name(data / f"{sub}.extracting")  # this process's own: two runs never share one
    try:
        extract(archive, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space; a half extraction is never used
        raise
    inner = tmp / sub
    os.replace(inner if inner.is_dir() else tmp, folder)  # Kaggle's zips hold a top folder named like the zip
    shutil.rmtree(tmp, ignore_errors=True)
    log.info(f"extracted {archive} to {folder}/")
    return folder


def extra_folder(given: str, data: Path) -> Path:
    """--extra-data's images folder: DIR/images/ of the unpacked dataset, or DIR itself."""
    root = Path(given)
    if not root.is_dir():
        raise CatDogError(f"--extra-data {root}: no such folder; give the unpacked Oxford-IIIT Pet dataset "
                          f"(images.tar.gz of {EXTRA_URL}) or its images/ folder")
    folder = root / "images" if (root / "images").is_dir() else root
    inside = [top for top in DERIVED if folder.resolve().is_relative_to((data / top).resolve())]
    if inside:  # 01 replaces those folders, and the links in them would point at themselves
        raise CatDogError(f"--extra-data {root}: {folder}/ lies inside {data / inside[0]}/, which this step "
                          f"rebuilds: give the unpacked Oxford-IIIT Pet dataset's own images/ folder")
    return folder


def extra_images(checks: pd.DataFrame, folder: Path, given: str) -> tuple[pd.DataFrame, Counter]:
    """The image entries of --extra-data's folder, and how many others there were of each suffix.

    The dataset's images/ folder also holds a few .mat files: those are no images and are only counted.
    """
    is_image = np.array([Path(n).suffix.lower() in IMAGE_SUFFIXES for n in checks.name], dtype=bool)
    others = Counter(Path(n).suffix.lower() or "(no suffix)" for n in checks.name[~is_image])
    if not any(parse_extra_name(n) for n in checks.name):
        raise CatDogError(f"--extra-data {given}: {folder}/ holds no Oxford-IIIT Pet images (named like "
                          f"Abyssinian_1.jpg or yorkshire_terrier_5.jpg): give the unpacked dataset (images.tar.gz "
                          f"of {EXTRA_URL}), which holds images/, or that images/ folder")
    return checks[is_image].reset_index(drop=True), others


def extract(archive: Path, into: Path) -> None:
    """Every member of `archive` under `into`; a bad zip or a full disk becomes one clear error."""
    need = 0
    try:
        with zipfile.ZipFile(archive) as z:
            members = z.infolist()
            need = sum(m.file_size for m in members)
            for member in helper.progress(members, f"extracting {archive.name}", unit="file", leave=True):
                z.extract(member, into)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise CatDogError(f"{archive}: not a valid zip ({e}); download it again") from e
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise helper.no_space(archive.parent, f"extracting {archive.name}", need) from e
        raise


def holds(path: Path, df: pd.DataFrame) -> bool:
    """True when `path` is exactly the CSV that helper.write_csv would write for `df`."""
    return path.is_file() and path.read_bytes() == df.to_csv(index=False).encode()


# ----------------------------------------------------------------------------- choosing the images

def refuse_duplicate_ids(folder: Path, names, parse, fix: str) -> None:
    """Names differing only in leading zeros (`cat.1.jpg`, `cat.01.jpg`) stand for one Kaggle id."""
    first = {}
    for name in names:
        other = first.setdefault(parse(name), name)
        if other != name:
            raise CatDogError(f"{folder / other} and {folder / name} have the same image id: {fix}")


def nested_hint(folder: Path, parse) -> str:
    """How to fix images that lie one folder deeper (train/train/, as some unzip tools make it), if they do."""
    with contextlib.suppress(OSError):
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            if any(parse(name) for name in os.listdir(sub)):
                aside = folder.with_name(f"{folder.name}.outer")
                q = shlex.quote
                return (f": its images lie one folder deeper, in {sub}/ (as some unzip tools make it); move them up, "
                        f"e.g. mv {q(str(folder))} {q(str(aside))} && mv {q(str(aside / sub.name))} {q(str(folder))}")
    return " (see the messages above)"


def usable_images(checks: dict[str, pd.DataFrame], folders: dict[str, Path], exclude: str | None
                  ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, set[str]]:
    """The Kaggle training, Kaggle test and --extra-data images to use (the last empty without extra data),
    and the names --exclude removed; refuses what cannot train."""
    usable = {key: c[c.problem == ""] for key, c in checks.items()}
    parsers = {"train": helper.parse_train_name, "test": helper.parse_test_name, EXTRA: parse_extra_name}
    for key in usable:
        if usable[key].empty:
            raise CatDogError(f"no usable images in {folders[key]}/{nested_hint(folders[key], parsers[key])}")
    train_ok, test_ok = usable["train"], usable["test"]
    extra_ok = usable.get(EXTRA, train_ok.iloc[:0])
    excluded = set()
    if exclude:
        wanted = set(helper.read_name_list(exclude))
        excluded = wanted & (set(train_ok.name) | set(extra_ok.name))
        for name in sorted(wanted - excluded):
            log.warning(f"--exclude {exclude}: {name} is not among the usable training images")
    labels_before = {helper.parse_train_name(n)[0] for n in train_ok.name}
    train_ok = train_ok[~train_ok.name.isin(excluded)]
    extra_ok = extra_ok[~extra_ok.name.isin(excluded)]
    labels = {helper.parse_train_name(n)[0] for n in train_ok.name}
    for label, cls in enumerate(CLASSES):
        if label not in labels:
            cause = f"--exclude {exclude} leaves none" if label in labels_before else "see the messages above"
            raise CatDogError(f"no usable {cls} images in {folders['train']}/ ({cause}): training needs images of "
                              f"both classes, named cat.N.jpg and dog.N.jpg")
    refuse_duplicate_ids(folders["train"], train_ok.name, helper.parse_train_name,
                         "remove or rename one of them, or leave one out with --exclude")
    refuse_duplicate_ids(folders["test"], test_ok.name, helper.parse_test_name, "remove or rename one of them")
    return train_ok, test_ok, extra_ok, excluded


def make_split(train_ok: pd.DataFrame, valid_frac: float, seed: int, groups: pd.DataFrame | None = None
               ) -> pd.DataFrame:
    """filename, label, subset in label then numeric id order, each duplicate group of `groups` on one side;
    refuses a split with an empty part."""
    parsed = [helper.parse_train_name(n) for n in train_ok.name]
    order = sorted(range(len(parsed)), key=lambda i: parsed[i])
    split = pd.DataFrame({"filename": train_ok.name.to_numpy()[order],
                          "label": [parsed[i][0] for i in order]})
    split["subset"] = np.where(helper.stratified_split(split.label, valid_frac, seed,
                                                       helper.group_ids(split.filename, groups)), "valid", "train")
    counts = split.groupby(["subset", "label"]).size()
    parts = {(s, lab): int(counts.get((s, lab), 0)) for s in ("train", "valid") for lab in range(len(CLASSES))}
    if min(parts.values()) == 0:
        shown = "; ".join(f"{s}: " + ", ".join(f"{cls} {parts[s, lab]}" for lab, cls in enumerate(CLASSES))
                          for s in ("train", "valid"))
        per_class = split.label.value_counts()
        n, smallest = int(per_class.min()), CLASSES[int(per_class.idxmin())]
        # round(n * f) is within 1..n-1 for every class when f is within [1/n, (n-1)/n] of the smallest one;
        # integer hundredths keep the bounds inside that range.
        advice = (f"use a --valid-frac from {-(-100 // n) / 100} to {100 * (n - 1) // n / 100}" if n >= 2 else
                  f"each class needs at least 2 usable images, {smallest} has {n}")
        raise CatDogError(f"--valid-frac {valid_frac} leaves a part of the split empty ({shown}): {advice}")
    return split


def add_extra_rows(split: pd.DataFrame, extra_ok: pd.DataFrame) -> pd.DataFrame:
    """split.csv's rows: Kaggle's split, made as without extra data, then the extra images in label, breed and
    number order, all in 'train': valid stays Kaggle's, so val_loss compares with the report's."""
    split = split.assign(source=helper.SOURCES[0])
    if extra_ok.empty:
        return split
    names = sorted(extra_ok.name, key=lambda n: (parse_extra_name(n), n))
    extra = pd.DataFrame({"filename": names, "label": [parse_extra_name(n)[0] for n in names],
                          "subset": "train", "source": EXTRA})
    return pd.concat([split, extra], ignore_index=True)


# ----------------------------------------------------------------------------- layout

def planned_entries(data: Path, split: pd.DataFrame, test_names: list[str],
                    extra: Path | None = None) -> dict[str, Path]:
    """Every derived entry (relative path under data/) -> the original it stands for (`extra`: the folder of
    split.csv's oxford-pets rows)."""
    plan = {}
    for name, label, subset, source in split.itertuples(index=False):
        src = (extra if source == EXTRA else data / "train") / name
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


def foreign_entries(data: Path, originals: list[Path], cache: pd.DataFrame) -> list[Path]:
    """What the derived folders hold that 01 did not make, and a rebuild would remove: 01's own are the layout's
    folders, links to an original (in train/, test/ or an --extra-data folder, the last run's too) and copies of one
    (same name, size and mtime, as shutil.copy2 keeps them, or the same bytes), of an image on disk or last checked."""
    layout = {helper.TEST2.as_posix(), *(f"{top}/{cls}" for top in (helper.TRAIN2, f"{helper.SPLITTED}/train",
                                                                    f"{helper.SPLITTED}/valid") for cls in CLASSES)}
    layout |= {str(Path(rel).parent) for rel in layout}
    folders = {os.path.realpath(f) for f in originals}
    checked = {(r.name, r.bytes, r.mtime_ns) for r in cache.itertuples(index=False)}
    resolved = {}  # the links of one folder share their target's folder: resolved once

    def made(entry: os.DirEntry) -> bool:
        if entry.is_symlink():
            where = os.path.dirname(os.path.join(os.path.dirname(entry.path), os.readlink(entry.path)))
            if where not in resolved:
                resolved[where] = os.path.realpath(where) in folders
            return resolved[where]
        if not entry.is_file(follow_symlinks=False):
            return False
        st = entry.stat(follow_symlinks=False)
        if (entry.name, st.st_size, st.st_mtime_ns) in checked:
            return True
        return any(o.is_file() and o.stat().st_size == st.st_size and (o.stat().st_mtime_ns == st.st_mtime_ns
                   or filecmp.cmp(o, entry.path, shallow=False)) for o in (Path(f) / entry.name for f in originals))

    foreign = []

    def walk(rel: str) -> None:
        for entry in sorted(os.scandir(data / rel), key=lambda e: e.name):
            inner = f"{rel}/{entry.name}"
            if inner in layout and entry.is_dir(follow_symlinks=False):
                walk(inner)
            elif not made(entry):  # a folder of the user's is named as a whole
                foreign.append(data / inner)

    for top in DERIVED:
        if (data / top).is_dir() and not (data / top).is_symlink():
            walk(top)
        elif os.path.lexists(data / top):
            foreign.append(data / top)
    return foreign


def refuse_foreign(data: Path, foreign: list[Path]) -> None:
    """No step removes what it did not make: the user's files in a derived folder stop the rebuild, named."""
    if foreign:
        shown = ", ".join(map(str, foreign[:5])) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise CatDogError(f"{shown}: not made by 01 (not a link to, or a copy of, an image of train/ or test/), in "
                          f"folders it rebuilds ({', '.join(f'{t}/' for t in DERIVED)} of {data}), which would remove "
                          "them: move them out of there (01 reads the images of train/ and test/) and rerun 01")


def build_layout(data: Path, plan: dict[str, Path], copy: bool) -> None:
    """Build the derived folders beside the old ones, then swap them in: no stale entry survives."""
    helper.remove_stale_temps(data, ".reorganize.*")
    tmp = helper.temp_name(data / "reorganize")  # this process's own: two runs never share one
    try:
        for rel, src in helper.progress(plan.items(), "linking" if not copy else "copying", unit="file",
                                        disable=len(plan) < 2000, leave=True):
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if copy:
                shutil.copy2(src, dst)
            elif Path(os.path.abspath(src)).is_relative_to(os.path.abspath(data)):
                # relative to the final place, so the data folder can move as a whole
                os.symlink(os.path.relpath(src, (data / rel).parent), dst)
            else:  # --extra-data outside data/: stays where it is when data/ moves
                os.symlink(os.path.abspath(src), dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # gives the space back; the originals are untouched
        if e.errno == errno.ENOSPC:
            need = sum(src.stat().st_size for src in plan.values()) if copy else 0
            raise helper.no_space(data, "copying" if copy else "linking", need,
                           " (or leave out --copy: links take almost none)" if copy else "") from e
        raise
    for top in DERIVED:
        old = data / f".{top}.old"
        shutil.rmtree(old, ignore_errors=True)  # a killed run's, once in place: 01's own links or copies
        if (data / top).exists():
            os.replace(data / top, old)
        if (tmp / top).exists():
            os.replace(tmp / top, data / top)
        shutil.rmtree(old, ignore_errors=True)  # removes links only; the originals are untouched
    shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- EDA

def write_eda(data: Path, checks: pd.DataFrame) -> None:
    """The report's size scatter (with and without the >1000 px outliers) and aspect-ratio histogram.

    Redrawn only when the training images changed: the seed or the split do not change them.
    """
    eda = data / "eda"
    sizes = checks[["name", "width", "height"]].reset_index(drop=True)
    sizes["aspect"] = sizes.width / sizes.height
    if holds(eda / "sizes.csv", sizes) and (eda / "sizes.png").is_file() and (eda / "aspect.png").is_file():
        return
    plt = helper.pyplot()
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
    log.info(f"wrote {eda}/: image sizes and aspect ratios of the {len(sizes)} usable training images")


# ----------------------------------------------------------------------------- main

def find_duplicates(data: Path, train_ok: pd.DataFrame, extra_ok: pd.DataFrame, test_ok: pd.DataFrame
                    ) -> pd.DataFrame:
    """The duplicate groups among the images used (from the hashes of the checks), saved by save_groups."""
    labels = {"train": [helper.parse_train_name(n)[0] for n in train_ok.name],
              EXTRA: [parse_extra_name(n)[0] for n in extra_ok.name], "test": [-1] * len(test_ok)}
    rows = pd.concat([helper.hash_rows(df, part, labels[part])
                      for part, df in (("train", train_ok), (EXTRA, extra_ok), ("test", test_ok))], ignore_index=True)
    groups = helper.find_groups(rows)
    log.info(helper.save_groups(data, groups))
    return groups


def report_problems(checks: pd.DataFrame) -> None:
    for r in checks[checks.problem != ""].itertuples():
        log.warning(f"skipped {r.folder}/{r.name}: {r.problem}")
    for r in checks[(checks.problem == "") & (checks.note != "")].itertuples():
        log.info(f"kept    {r.folder}/{r.name}: {r.note}")


def main(args):
    data = Path(args.data_dir)
    extra = extra_folder(args.extra_data, data) if args.extra_data else None  # before any download
    if data.exists() and not data.is_dir():
        raise CatDogError(f"--data-dir {data} is a file, not a folder: give the folder of train/ and test/ "
                          "(or of train.zip and test.zip)")
    if args.download and not data.is_dir():
        helper.kaggle_credentials("--download")  # missing ones are refused before the folder is made
    if args.download or args.demo:
        data.mkdir(parents=True, exist_ok=True)
    elif not data.is_dir():
        ensure_folder(data, "train")  # says what to put there
    # One run at a time: two would mix one's splitted/ with the other's split.csv.
    with helper.exclusive_lock(data / helper.DATA_LOCK, "01"):
        return organize(args, data, extra)


def organize(args, data: Path, extra: Path | None) -> dict:
    if args.download:
        helper.download_competition(data)
    if args.demo:
        helper.make_demo_dataset(data, args.demo, args.seed)
    folders = {sub: ensure_folder(data, sub) for sub in ("train", "test")}
    if extra:
        folders[EXTRA] = extra
    parsers = {"train": helper.parse_train_name, "test": helper.parse_test_name, EXTRA: parse_extra_name}

    cache_path = data / helper.CHECK_CACHE
    cache = helper.read_check_cache(cache_path)
    checks = {key: helper.check_folder(folder, parsers[key], cache, args.workers, key, NAME_PATTERNS[key])
              for key, folder in folders.items()}
    others = Counter()
    if args.extra_data:
        checks[EXTRA], others = extra_images(checks[EXTRA], folders[EXTRA], args.extra_data)
    table = pd.concat(checks.values(), ignore_index=True)
    meta_path, split_path = data / helper.SPLIT_META, data / helper.SPLIT_CSV
    old_meta = helper.read_json(meta_path)
    was = (old_meta or {}).get("extra_data")  # the last run's --extra-data folder: its links and copies are 01's
    old_extra = [Path(was["dir"])] if isinstance(was, dict) and isinstance(was.get("dir"), str) else []
    # Found while the old cache still knows the images removed since (their copies are 01's), and that cache kept
    # until the layout is settled when there are any: a refused run must not make them look foreign to the next.
    foreign = foreign_entries(data, [*folders.values(), *old_extra], cache)
    if not foreign and not holds(cache_path, table):  # left alone otherwise, so a rerun changes nothing on disk
        helper.write_csv(table, cache_path)
    report_problems(table)

    train_ok, test_ok, extra_ok, excluded = usable_images(checks, folders, args.exclude)
    # Kaggle's rows are split exactly as without --extra-data; the extra ones only add training rows.
    groups = find_duplicates(data, train_ok, extra_ok, test_ok)
    split = add_extra_rows(make_split(train_ok, args.valid_frac, args.seed,
                                      groups if not args.no_group_duplicates else None), extra_ok)
    test_names = sorted(test_ok.name, key=helper.parse_test_name)
    is_extra = (split.source == EXTRA).to_numpy()
    extra_meta = None
    if args.extra_data:  # the resolved folder: another copy of the dataset is another layout (link targets)
        extra_meta = {"dir": str(folders[EXTRA].resolve()), "source": EXTRA,
                      **{cls: int((split.label[is_extra] == lab).sum()) for lab, cls in enumerate(CLASSES)}}

    unusable = checks["test"][checks["test"].problem != ""]
    meta = {"seed": args.seed, "valid_frac": args.valid_frac, "copy": args.copy, "excluded": sorted(excluded),
            "extra_data": extra_meta, "group_duplicates": not args.no_group_duplicates,
            # every entry of test/ seen and not used: 07 still owes Kaggle a row for each that has an id
            "test_unusable": [[n, helper.test_entry_id(n), why]
                              for n, why in zip(unusable.name, unusable.problem, strict=True)],
            "split_sha256": hashlib.sha256(split.to_csv(index=False).encode()).hexdigest(),
            "test_sha256": hashlib.sha256("\n".join(test_names).encode()).hexdigest()}
    plan = planned_entries(data, split, test_names, folders.get(EXTRA))
    if (old_meta == meta and split_path.is_file() and helper.file_sha256(split_path) == meta["split_sha256"]
            and layout_matches(data, plan, args.copy)):
        log.info(f"{data}/ is already organized with these settings: nothing changed")
    else:
        refuse_foreign(data, foreign)
        build_layout(data, plan, args.copy)
        helper.write_csv(split, split_path)
        helper.write_json(meta, meta_path)
        log.info(f"wrote {helper.TRAIN2}/, {helper.SPLITTED}/, {helper.TEST2}/ "
                 f"({'copies' if args.copy else 'links'}) and {helper.SPLIT_CSV} under {data}/")
    if foreign and not holds(cache_path, table):  # kept (nothing rebuilt, nothing removed): now current
        helper.write_csv(table, cache_path)
    write_eda(data, train_ok)

    counts = split.groupby(["subset", "label"]).size()
    n_bad = {sub: int((c.problem != "").sum()) for sub, c in checks.items()}
    kaggle = split[~is_extra]
    log.info(f"labelled: {len(kaggle)} used (cat {int((kaggle.label == 0).sum())}, dog {int(kaggle.label.sum())}), "
             f"{n_bad['train']} skipped, {len(excluded)} excluded")
    if extra_meta:
        ignored = ", ".join(f"{n} {suffix}" for suffix, n in sorted(others.items()))
        log.info(f"extra: {int(is_extra.sum())} {EXTRA} images from {folders[EXTRA]}/ added to train (cat "
                 f"{extra_meta['cat']}, dog {extra_meta['dog']}), {n_bad[EXTRA]} skipped"
                 + (f"; not images, ignored: {ignored}" if ignored else ""))
    for subset in ("train", "valid"):
        log.info(f"  {subset}: cat {counts.get((subset, 0), 0)}, dog {counts.get((subset, 1), 0)}"
                 + (" (with the extra images)" if subset == "train" and is_extra.any() else ""))
    log.info(f"test: {len(test_names)} used, {n_bad['test']} skipped; split seed {args.seed}, "
             f"valid fraction {args.valid_frac}")
    if len(unusable):  # last, apart from the progress lines: a submission without them is rejected by Kaggle
        shown = ", ".join(unusable.name[:100]) + (f" and {len(unusable) - 100} more" if len(unusable) > 100 else "")
        log.warning(f"{len(unusable)} test entries of {folders['test']}/ could not be used (why: the 'skipped' "
                    f"lines above; all in {meta_path}): {shown}. Kaggle wants a row for every test id: 07 refuses a "
                    f"submission without them unless --fill-unreadable P; better fix or replace them and rerun 01")
    return {"split": split, "test_names": test_names, "checks": checks, "excluded": excluded, "groups": groups}


if __name__ == "__main__":
    helper.run_cli(main, parse_args())
