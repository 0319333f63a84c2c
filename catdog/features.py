"""The feature cache: what makes a feature (or maps) file's numbers (ExtractSettings), the HDF5 files 02 and 04
write batch by batch, the checks that reuse one only when it still matches its settings and rows, and Features,
the aligned rows of several backbones that the heads train on.

A file holds `labelled` (every labelled row, split.csv order), `labelled_files`, `label`, `test` (ids ascending),
`test_ids`; with views `labelled_views`/`test_views` and their `*_view_params`; the settings as attributes,
`complete=True` last. Files of the release before this one named the labelled datasets `train*`: they still read.

Used by: 02 and 04 (writing), 03, 05, 06, 07 and 08 (reading).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import math
import os
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .backbones import BACKBONES
from .common import DEFAULT_SEED, FEATURES, PREDICT_BATCH, SPLIT_CSV, TEST2, CatDogError, progress, versions
from .data import laid_out_test_ids, read_split, test_images, train_image_paths
from .files import check_writable_target, remove_stale_temps, temp_name
from .images import find_undecodable, image_dataset, view_params
from .precision import legacy_precision

# The datasets' names in files of the release before this one, which still read.
LEGACY_NAMES = {"labelled": "train", "labelled_files": "train_files", "labelled_views": "train_views",
                "labelled_view_params": "train_view_params"}
# The image names that seed each view's transformation keep the part's first name: the same views as before.
VIEW_DRAW_PART = {"labelled": "train", "test": "test"}


def dataset(f, name: str):
    """Dataset `name` of an open feature file, under its current name or the one older files gave it."""
    return f[name] if name in f or name not in LEGACY_NAMES else f[LEGACY_NAMES[name]]


def feature_path(data_dir: str | Path, name: str) -> Path:
    """data/features/<name>.h5"""
    return Path(data_dir) / FEATURES / f"{name}.h5"


def feature_file_state(path: Path) -> dict | None:
    """A feature file's attributes if it is complete, else None."""
    import h5py
    with contextlib.suppress(OSError):
        with h5py.File(path, "r") as f:
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        return attrs if attrs.get("complete") else None
    return None


@dataclass(frozen=True)
class ExtractSettings:
    """Everything that changes the numbers in a feature or maps file (the one source of truth for "settings"):
    the file's attributes, compared before reuse and kept in each model's sidecar, so a model only gets its own."""
    backbone: str
    image_size: int
    interpolation: str = "bilinear"
    decoder: str = "pil"
    jpeg_draft: bool = False
    weights: str = "imagenet"
    seed: int = DEFAULT_SEED
    precision: str = "float32"  # the CNN's compute (--precision); files of the release before: mixed_precision
    split_layer: str = ""     # maps files: the layer the backbone was cut after ("" for pooled features)
    dtype: str = "float32"
    views: int = 1            # 02 --views: feature rows of augmented views beside the plain ones
    views_dtype: str = ""     # their storage type ("" without views)
    # How the backbone's features are pooled (Backbone.pooling; "" = the registry's). Files and sidecars without
    # it were made before it was recorded, with plain "avg" pooling: ConvNeXt's then averaged normalised maps.
    pooling: str = ""

    def __post_init__(self):
        if not self.pooling:
            bb = BACKBONES.get(self.backbone)
            object.__setattr__(self, "pooling", bb.pooling if bb else LEGACY_POOLING)

    def attrs(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, attrs: dict) -> ExtractSettings:  # the settings stored in a file's (or sidecar's) attributes
        attrs = legacy_precision(attrs)
        return cls(**({"pooling": LEGACY_POOLING}
                      | {f.name: attrs[f.name] for f in dataclasses.fields(cls) if f.name in attrs}))


LEGACY_POOLING = "avg"  # the pooling of files and sidecars that do not record theirs


# Settings that add rows beside the plain ones without changing them: a model trained on a file's plain rows can
# use the file whatever its views.
VIEW_SETTINGS = ("views", "views_dtype")
ROW_SETTINGS = tuple(f.name for f in dataclasses.fields(ExtractSettings) if f.name not in VIEW_SETTINGS)


def setting_changes(stored: dict, wanted: dict, keys: Sequence[str] | None = None) -> list[str]:
    """The settings (all, or those in `keys`) in which two attribute sets differ; the seed only matters for
    random weights (`none`) or for views (it draws their transformations). A setting absent from a set (a file
    written before it existed) has its default."""
    stored, wanted = legacy_precision(stored), legacy_precision(wanted)

    def plain(attrs, f):  # HDF5 gives numpy scalars back
        v = attrs.get(f.name, LEGACY_POOLING if f.name == "pooling" else f.default)
        return v.item() if hasattr(v, "item") else v
    return [f.name for f in dataclasses.fields(ExtractSettings)
            if (keys is None or f.name in keys) and plain(stored, f) != plain(wanted, f)
            and (f.name != "seed" or str(wanted.get("weights")) == "none"
                 or (int(wanted.get("views", 1)) > 1 and (keys is None or "views" in keys)))]



def check_same_settings(trained: dict, now: dict, what: str, now_where: str, fix: str,
                        keys: Sequence[str] = ROW_SETTINGS) -> None:
    """Refuse to use `what` (trained on features made with the `trained` settings) with features made with
    `now` (at `now_where`), naming both; `keys` limits the comparison to some settings (by default those of the
    plain rows: views are checked where they are used)."""
    changed = setting_changes(trained, now, keys)
    trained, now = legacy_precision(trained), legacy_precision(now)
    if changed:
        raise CatDogError(f"{what} was trained on features made with "
                          + ", ".join(f"{k}={trained.get(k)}" for k in changed) + f"; {now_where} now gives "
                          + ", ".join(f"{k}={now.get(k)}" for k in changed) + f": {fix}")


def rebuild_command(name: str, attrs: dict) -> str:
    """The command that makes the feature (or maps) file `name` again with the settings in `attrs`."""
    st = ExtractSettings.of({"backbone": name.split("_")[0], "image_size": 0, **attrs})
    q = shlex.quote  # a --weights folder may hold spaces: the command is pasted into a shell
    flags = (f"--image-size {st.image_size} --weights {q(st.weights)} --interpolation {q(st.interpolation)} "
             f"--decoder {q(st.decoder)} --seed {st.seed}")
    flags += f" --precision {st.precision}" * (st.precision != "float32")
    if st.split_layer:
        return (f"04_finetune_split.py --model {q(st.backbone)} --split-layer {q(st.split_layer)} "
                f"--dtype {q(st.dtype)} {flags}")
    return f"02_extract_features.py --models {q(st.backbone)} {flags}" + " --jpeg-draft" * st.jpeg_draft


class FeatureWriter:
    """Appends feature rows to an HDF5 file built under a temp name (this process's own); `complete=True` and the
    rename come last. As a context manager it closes the file and removes the temp file whatever happens.

    With `view_params` ({'labelled': (V, N, 6), 'test': (V, M, 6)}, from view_params), the file also holds
    `labelled_views` (V, N, ...) and `test_views` (V, M, ...) in `views_dtype`, and the transformations as
    `labelled_view_params` and `test_view_params`; view 0 is written with the plain rows."""

    def __init__(self, path: Path, labelled_files: Sequence[str], labels: Sequence[int], test_ids: Sequence[int],
                 feature_shape: tuple[int, ...], dtype: str, attrs: dict,
                 view_params: dict[str, np.ndarray] | None = None, views_dtype: str = "float16"):
        self.path, self.tmp, self.file, self.attrs = check_writable_target(path), temp_name(path), None, attrs
        self.columns = {"label": np.asarray(labels, dtype=np.uint8), "test_ids": np.asarray(test_ids, dtype=np.int64),
                        "labelled_files": np.asarray(labelled_files, dtype=object).astype("S")}
        self.shape = {"labelled": (len(labelled_files), *feature_shape), "test": (len(test_ids), *feature_shape)}
        self.dtypes = {"labelled": dtype, "test": dtype}
        if view_params:
            for part, params in view_params.items():
                self.columns[f"{part}_view_params"] = np.asarray(params, np.float32)
                self.shape[f"{part}_views"] = (len(params), *self.shape[part])
                self.dtypes[f"{part}_views"] = views_dtype
        self.feature_shape = tuple(feature_shape)
        self.pos = {"labelled": 0, "test": 0} | {(part, v): 0 for part, params in (view_params or {}).items()
                                              for v in range(len(params))}

    def __enter__(self) -> FeatureWriter:
        import h5py
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.path.parent)  # a killed extraction's half file: GBs for 04's maps
        try:
            self.file = h5py.File(self.tmp, "w")
            # One row per chunk: streaming training reads single rows fast; no compression (10x slower reads).
            row = self.feature_shape
            self.data = {part: self.file.create_dataset(part, shape, self.dtypes[part],
                                                        chunks=(1,) * (len(shape) - len(row)) + row)
                         for part, shape in self.shape.items()}
            for k, v in self.columns.items():
                self.file[k] = v
        except BaseException:
            self.__exit__()
            raise
        return self

    def append(self, part: str, rows: np.ndarray, view: int = 0) -> None:
        """Write the next batch of rows of `part` ('labelled' or 'test'), of its plain images (view 0: also the first
        of its views) or of view `view`."""
        if view == 0:
            start = self.pos[part]
            self.data[part][start:start + len(rows)] = rows
            self.pos[part] = start + len(rows)
        if (part, view) in self.pos:
            start = self.pos[part, view]
            # numpy's rounding to float16, not HDF5's (which differs in the last bit): view 0 then equals
            # the plain rows cast with astype exactly.
            self.data[f"{part}_views"][view, start:start + len(rows)] = rows.astype(self.dtypes[f"{part}_views"])
            self.pos[part, view] = start + len(rows)

    def commit(self) -> None:
        """Check every row was written, mark complete, rename into place."""
        for key, count in self.pos.items():  # 'labelled', 'test', and (part, view) pairs
            want = self.shape[key if isinstance(key, str) else key[0]][0]
            if count != want:
                raise RuntimeError(f"{self.path}: wrote {count} of {want} {key} rows")
        self.file.attrs.update({**self.attrs, "complete": True})
        self.file.close()
        os.replace(self.tmp, self.path)

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            with contextlib.suppress(Exception):
                self.file.close()
        self.tmp.unlink(missing_ok=True)


def image_parts(data_dir: str | Path) -> tuple[pd.DataFrame, dict[str, list[str]], np.ndarray]:
    """split.csv, the image paths of the 'labelled' (split.csv order) and 'test' (id order) rows, test ids."""
    split = read_split(data_dir)
    ids, test_paths = test_images(data_dir)
    return split, {"labelled": train_image_paths(data_dir, split), "test": test_paths}, ids


def rows_mismatch(path: Path, split: pd.DataFrame, test_ids: np.ndarray) -> str:
    """Why the rows of a complete feature file no longer line up with split.csv or the test images 01
    laid out ('' when they do)."""
    import h5py
    with h5py.File(path, "r") as f:
        files, ids = dataset(f, "labelled_files")[:].astype(str), f["test_ids"][:]
    if not np.array_equal(files, split.filename.to_numpy(str)):
        return (f"its {len(files)} labelled rows do not match the order of {SPLIT_CSV} ({len(split)} rows): "
                f"01 was rerun since")
    if not np.array_equal(ids, test_ids):
        was, now = set(ids.tolist()), set(test_ids.tolist())
        gone, new = sorted(was - now), sorted(now - was)
        return (f"its {len(ids)} test rows do not match the {len(test_ids)} images in {TEST2} (gone: {gone[:3]}, "
                f"new: {new[:3]}): the test folder changed since")
    return ""


def stale_reason(path: Path, settings: ExtractSettings, split: pd.DataFrame, test_ids: np.ndarray) -> str:
    """Why an existing feature file must be redone ('missing', 'incomplete', other settings or rows),
    or '' when it can be kept."""
    state = feature_file_state(path)
    if state is None:
        return "missing" if not path.exists() else "incomplete"
    state = legacy_precision(state)
    changed = setting_changes(state, settings.attrs())
    if changed:
        return "made with other settings (" + ", ".join(f"{k}={state.get(k)}, now {getattr(settings, k)}"
                                                         for k in changed) + ")"
    return rows_mismatch(path, split, test_ids)


def make_extract_step(model, preprocess, strategy=None):
    """A compiled step: a batch of [0, 255] images -> float32 model outputs, replica-parallel on several GPUs."""
    import tensorflow as tf

    # A free batch dimension: the smaller last batch must not trigger a second trace of the whole CNN.
    @tf.function(input_signature=[tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)])
    def step(x):
        return tf.cast(model(preprocess(x), training=False), tf.float32)

    if strategy is None or strategy.num_replicas_in_sync == 1:
        return step

    @tf.function(reduce_retracing=True)
    def distributed_step(x):
        return strategy.gather(strategy.run(step, args=(x,)), axis=0)

    return distributed_step


def undecodable_message(chunk: Sequence[str], settings: ExtractSettings, resize=None) -> str:
    """What is wrong with the image of `chunk` the pipeline could not decode, and what to do. 01 keeps what Pillow
    reads, so advising a rerun of 01 helps only with a file Pillow cannot read either (changed since 01, or 01
    not run); one only TensorFlow's decoder fails on (an animated GIF) needs another decoder or a conversion."""
    bad = find_undecodable(chunk, settings.image_size, settings.interpolation, settings.decoder, resize)
    if bad is None:
        return (f"cannot decode an image in {', '.join(chunk[:3])}: rerun 01_reorganize_data.py, which skips "
                f"broken files")
    if settings.decoder != "pil" and find_undecodable([bad], settings.image_size, settings.interpolation,
                                                      resize=resize) is None:
        return (f"cannot decode {bad} with --decoder {settings.decoder} (TensorFlow's decoder reads JPEG, PNG, "
                f"BMP and single-frame GIF; this file is something else, such as an animated GIF), though Pillow "
                f"reads it, so 01 keeps it: extract with --decoder pil (the default), or convert the file to a "
                f"JPEG and rerun 01_reorganize_data.py")
    return f"cannot decode {bad}: rerun 01_reorganize_data.py, which skips broken files"


def extract_to_file(step, shape: tuple[int, ...], data_dir: str | Path, out_path: Path, settings: ExtractSettings,
                    batch_size: int, strategy=None, resize=None) -> int:
    """Run every train2 (labelled) and test2 image through `step` (see make_extract_step) into an HDF5 file of rows of
    `shape`, batch by batch: memory stays flat, the file appears only once complete. Returns the image count.
    `resize` (an encoder's image converter resize) replaces the stretch of the plain images."""
    import tensorflow as tf

    split, parts, ids = image_parts(data_dir)
    attrs = {**settings.attrs(), **versions()}
    params = {part: np.stack([view_params(settings.seed, [f"{VIEW_DRAW_PART[part]}/{Path(p).name}" for p in paths], v)
                              for v in range(settings.views)]) for part, paths in parts.items()
              } if settings.views > 1 else None
    try:
        with FeatureWriter(out_path, split.filename, split.label, ids, shape, settings.dtype, attrs, params,
                           settings.views_dtype) as writer:
            for view, (part, paths) in itertools.product(range(settings.views), parts.items()):
                ds = image_dataset(paths, settings.image_size, batch_size, settings.interpolation,
                                   settings.jpeg_draft, decoder=settings.decoder, params=params[part][view] if view
                                   else None, resize=resize)
                if strategy is not None and strategy.num_replicas_in_sync > 1:
                    ds = strategy.experimental_distribute_dataset(ds)
                batches = iter(ds)
                desc = f"{out_path.stem} {part}" + (f" view {view}" if view else "")
                for k in progress(range(math.ceil(len(paths) / batch_size)), desc):
                    try:
                        x = next(batches)
                    except tf.errors.OpError as e:
                        chunk = paths[k * batch_size:(k + 1) * batch_size]
                        raise CatDogError(undecodable_message(chunk, settings, resize)) from e
                    writer.append(part, step(x).numpy().astype(settings.dtype), view)
            writer.commit()  # HDF5 flushes its chunk cache here: a full disk can surface now too
    except OSError as e:  # h5py's write errors carry the errno in their text only
        if e.errno != errno.ENOSPC and "No space left" not in str(e):
            raise
        need = sum(len(p) for p in parts.values()) * math.prod(shape) * (
            np.dtype(settings.dtype).itemsize + (settings.views * np.dtype(settings.views_dtype).itemsize
                                                 if settings.views > 1 else 0))
        raise CatDogError(f"{out_path.parent} is full: {out_path.name} needs about {need / 2**20:,.0f} MiB there; "
                          f"the partial file was removed. Free space and rerun") from e
    return sum(len(p) for p in parts.values())


@dataclass
class Features:
    """Aligned feature matrices of one or more backbones: `labelled` holds every labelled row (split.csv
    order, its train and valid rows), `test` every test row (id order)."""
    names: list[str]
    labelled: list[np.ndarray]
    labels: np.ndarray
    files: np.ndarray        # labelled rows' file names
    valid: np.ndarray        # boolean mask of split.csv's valid rows
    test: list[np.ndarray]
    test_ids: np.ndarray
    attrs: list[dict]
    paths: list[Path]
    labelled_views: list[np.ndarray] = dataclasses.field(default_factory=list)  # (V, N, D) each, when loaded
    test_views: list[np.ndarray] = dataclasses.field(default_factory=list)      # (V, M, D) each

    def subset(self, name: str) -> tuple[list[np.ndarray], np.ndarray]:
        """(inputs, labels) of split.csv's 'train' or 'valid' rows."""
        mask = self.valid if name == "valid" else ~self.valid
        return [x[mask] for x in self.labelled], self.labels[mask]

    def predict(self, model, part: str, batch_size: int = PREDICT_BATCH) -> np.ndarray:
        """Dog probabilities of the 'labelled' or 'test' rows: the one predict entry point for models fed
        from feature files. Parts not loaded (maps files are too big for RAM) are streamed from the files
        in contiguous slices."""
        if part.endswith("_views"):  # (V, rows): each view's probabilities
            views = self.labelled_views if part == "labelled_views" else self.test_views
            if not views:
                raise ValueError(f"{part} were not loaded")
            return np.stack([np.asarray(model.predict(model_inputs([x[v].astype(np.float32) for x in views]),
                                                      batch_size=batch_size, verbose=0)).ravel()
                             for v in range(len(views[0]))])
        loaded = {"labelled": self.labelled, "test": self.test}[part]
        if loaded:
            return np.asarray(model.predict(model_inputs(loaded), batch_size=batch_size, verbose=0)).ravel()
        import h5py
        with contextlib.ExitStack() as stack:
            rows = [dataset(stack.enter_context(h5py.File(p, "r")), part) for p in self.paths]
            n = rows[0].shape[0]
            out = [np.asarray(model.predict_on_batch(model_inputs([r[s:s + batch_size] for r in rows])))
                   for s in progress(range(0, n, batch_size), f"predict {part}")]
        return np.concatenate(out).ravel() if out else np.zeros(0, np.float32)


def load_features(model_names: Sequence[str], data_dir: str | Path, parts: Iterable[str] = ("labelled", "test"),
                  views: int | None = None) -> Features:
    """Load feature files and check they line up row by row with split.csv and the test images on disk.
    `parts` may also name 'labelled_views' and 'test_views': the first `views` views (all without it) of
    files 02 wrote with --views, checked to be the same transformations in every file."""
    import h5py
    parts = tuple(parts)
    view_parts = [p for p in parts if p.endswith("_views")]
    if view_parts:
        views = check_views(model_names, data_dir, views)
    split = read_split(data_dir)
    test_ids = laid_out_test_ids(data_dir)
    out, attrs, paths, file_ids = {"labelled": [], "test": [], "labelled_views": [], "test_views": []}, [], [], test_ids
    for name in model_names:
        path = feature_path(data_dir, name)
        state = feature_file_state(path)
        if state is None:
            step = (f"04_finetune_split.py --model {name.split('_')[0]}" if name.endswith("_maps")
                    else f"02_extract_features.py --models {name}")
            raise CatDogError(f"{path} is missing or incomplete: run {step}")
        mismatch = rows_mismatch(path, split, test_ids)
        if mismatch:
            raise CatDogError(f"{path}: {mismatch}: rerun {rebuild_command(name, state)}")
        with h5py.File(path, "r") as f:
            file_ids = f["test_ids"][:]  # the rows the file really holds (equal to the disk's, checked above)
            for part in parts:
                out[part].append(dataset(f, part)[:views] if part in view_parts else dataset(f, part)[:])
        attrs.append(state)
        paths.append(path)
    return Features(list(model_names), out["labelled"], split.label.to_numpy(np.float32), split.filename.to_numpy(str),
                    (split.subset == "valid").to_numpy(), out["test"], file_ids, attrs, paths,
                    out["labelled_views"], out["test_views"])


def check_views(model_names: Sequence[str], data_dir: str | Path, views: int | None) -> int:
    """Refuse feature files without `views` views (at least two when None: all they hold in common), or whose
    views are not the same transformations (another --seed); returns the number of views used."""
    import h5py
    states = {}
    for name in model_names:
        path = feature_path(data_dir, name)
        state = feature_file_state(path)
        if state is None:
            raise CatDogError(f"{path} is missing or incomplete: run 02_extract_features.py --models {name}")
        have, need = int(state.get("views", 1)), views or 2
        if have < need:
            raise CatDogError(f"{path} holds {'no augmented views' if have == 1 else f'{have} views'}"
                              f" and {need} are needed: rerun 02_extract_features.py --models {name} --views "
                              f"{views or 4} (or ask for fewer views)")
        states[name] = state
    used = views or min(int(st["views"]) for st in states.values())
    first = None
    for name, state in states.items():
        path = feature_path(data_dir, name)
        with h5py.File(path, "r") as f:
            params = dataset(f, "labelled_view_params")[:used], f["test_view_params"][:used]
        if first is not None and not all(np.array_equal(a, b) for a, b in zip(first[1], params, strict=True)):
            raise CatDogError(f"{path}'s views are other transformations than {first[0]}'s (extracted with --seed "
                              f"{state.get('seed')} and {first[2]}): rerun 02_extract_features.py --models {name} "
                              f"--views {state.get('views')} --seed {first[2]}")
        first = first or (path, params, state.get("seed"))
    return used



def model_inputs(xs: list[np.ndarray]):
    """A single array for one-input models, the list for merged ones."""
    return xs[0] if len(xs) == 1 else xs

