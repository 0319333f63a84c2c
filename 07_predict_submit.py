"""Step 7: predict the test images with the best model and write the Kaggle submission.

By default the model is hyperopt's best if there is one, else the best merged model, else the best
single head (lowest val_loss in their results.csv). Predictions are clipped to [0.005, 0.995]: a
confident mistake costs far more log loss than confidence gains. --analyze shows the worst-predicted
labelled images, like the report's section IV, and where the model looked (08's export). --kaggle-submit
MESSAGE then uploads the checked submission to Kaggle (needs API credentials, checked before any work).
Beyond the report: --tta averages feature views (02 --views); --blend, --calibrate temperature and --clip auto
fit weights, a temperature and the clip bound on out-of-fold (else valid) predictions, write <output stem>.json,
and with --analyze the suspects list model/analysis/suspects.txt.
Every test entry 01 saw needs a row (Kaggle rejects a submission without one): one 01 could not use is refused,
unless --fill-unreadable P. --known-labels submits the training label of a test image with exactly the pixels of a
labelled one (data/duplicates.csv). Both are recorded in <output stem>.json.
"""

import dataclasses
import json
import shlex
from pathlib import Path

import numpy as np
import pandas as pd

import helper
from helper import CLASSES, CatDogError, log, log_loss


def parse_args(argv=None):
    p = helper.base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", help="a saved .keras model of any step, fine-tuned ones (model/finetune/) too, or a "
                                   "K-fold folder (model/merge/<name>_k5: the mean of its fold models) "
                                   "(default: the best one found under --model-dir)")
    p.add_argument("--output", default="submissions/submission.csv", help="the submission CSV to write")
    helper.clip_args(p)
    p.add_argument("--blend", nargs="+", metavar="MODEL",
                   help="blend several models: names as in the results tables (ResNet50, ResNet50+Xception_k5, "
                        "hyperopt) or paths (a .keras, a K-fold folder), or 'auto' (every K-fold model, else every "
                        "saved head): non-negative weights summing to 1, fitted on their out-of-fold (else valid) "
                        "predictions; writes model/blend/results.csv")
    p.add_argument("--calibrate", default="none", choices=["none", "temperature"],
                   help="temperature: one temperature on the logit (Guo et al. 2017), fitted on the out-of-fold "
                        "(else valid) predictions, applied before clipping")
    p.add_argument("--clip", default="fixed", choices=["fixed", "auto"],
                   help="fixed: --clip-low/--clip-high (the report's [0.005, 0.995]); auto: the bound c in "
                        f"[{helper.CLIP_GRID[0]}, {helper.CLIP_GRID[-1]}] ([c, 1-c]) with the lowest out-of-fold "
                        "(else valid) log loss")
    p.add_argument("--blend-folds", type=helper.number(int, 2), default=5,
                   help="folds of the judged rows over which --blend, --calibrate and --clip auto are cross-fitted "
                        "to report an honest log loss (each fold judged by what the others fitted)")
    p.add_argument("--suspect-loss", type=helper.POSITIVE,
                   help="--analyze: list labelled images whose out-of-fold (else valid) log loss is above this in "
                        "model/analysis/suspects.txt (default: the worst 0.2%% of those rows)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the model over the test views of its feature files "
                        "(02 --views), or over each image and its mirror for 04 --mode full models")
    p.add_argument("--tta-mean", default="prob", choices=["prob", "logit"],
                   help="--tta: the arithmetic mean of the probabilities, or the mean of the logits")
    p.add_argument("--analyze", action="store_true",
                   help="also rank labelled images by |label - prediction| into model/analysis/ (with Grad-CAM "
                        "overlays of the worst when model/export/ holds 08's export of this model)")
    p.add_argument("--top", type=helper.POSITIVE_INT, default=20, help="images in the --analyze grid")
    p.add_argument("--known-labels", action="store_true",
                   help="predict the training label (clipped) of a test image whose decoded pixels equal those of a "
                        "labelled image (01's data/duplicates.csv; never a near duplicate); off by default: whether "
                        "that fits the competition's rules is your call")
    p.add_argument("--fill-unreadable", type=helper.PROBABILITY, nargs="?", const=0.5, metavar="P",
                   help="write P (default 0.5) for the test entries 01 saw but could not use (by default such a "
                        "submission is refused: Kaggle rejects one without every test id)")
    p.add_argument("--kaggle-submit", metavar="MESSAGE",
                   help=f"then upload the checked submission to Kaggle's {helper.KAGGLE_COMPETITION} with this "
                        "description (needs Kaggle API credentials)")
    args = p.parse_args(argv)
    helper.clip_range(p, args)
    if not args.output.strip():
        p.error("--output is empty: give the submission CSV's path")
    if args.blend and args.model:
        p.error("--model and --blend exclude each other: list every model to blend after --blend")
    if args.kaggle_submit is not None and not args.kaggle_submit.strip():
        p.error("--kaggle-submit is empty: give a message describing the submission, e.g. \"merged head, seed 2018\"")
    return args


@dataclasses.dataclass
class Candidate:
    """One model's honest predictions: by file name on the rows it can be judged on, and of the test images."""
    name: str
    source: Path
    judged: pd.Series
    test: np.ndarray
    oof: bool  # judged rows are out-of-fold predictions of every labelled Kaggle row (K-fold), else the valid rows


def locate(token: str, model_dir: Path) -> Path:
    """A --blend entry: a path, or a name found under --model-dir."""
    path = Path(token)
    if helper.is_temp(path):
        raise CatDogError(f"--blend {token}: a temp file of an unfinished (or killed) write, not a model: give a "
                          f"saved model or K-fold folder")
    if (path.suffix == ".keras" and path.is_file()) or (path / helper.KFOLD_SUMMARY).is_file():
        return path
    if path.is_dir() and not (path / helper.KFOLD_SUMMARY).is_file() and any(path.glob("fold*.keras")):
        raise CatDogError(f"--blend {token}: {helper.folder_problem(path)}")
    if token == "hyperopt" and (model_dir / helper.HYPEROPT_BEST).is_file():
        return model_dir / helper.HYPEROPT_BEST
    if path.name == token and token not in (".", ".."):  # a name (a path was taken above): found in its step's folder
        for step in (helper.MERGE_DIR, helper.SINGLE_DIR):
            for found in (model_dir / step / token, model_dir / step / f"{token}.keras"):
                if (found / helper.KFOLD_SUMMARY).is_file() or (found.suffix == ".keras" and found.is_file()):
                    helper.inside(found, model_dir / step, f"--blend {token}")  # not a symlink out of it
                    return found
    known = [p.stem if p.suffix else p.name for p in auto_models(model_dir, kfold_only=False)]
    raise CatDogError(f"--blend {token}: no such model under {model_dir}/ (give a name from its results tables or a "
                      f"path); found: {', '.join(known) or 'none (train with 03, 05 or 06 first)'}")


def auto_models(model_dir: Path, kfold_only: bool = True) -> list[Path]:
    """--blend auto: every finished K-fold model, else (or with kfold_only False, also) every saved head."""
    kfold = sorted(p.parent for step in (helper.SINGLE_DIR, helper.MERGE_DIR)
                   for p in helper.result_files(model_dir / step, f"*/{helper.KFOLD_SUMMARY}"))
    if kfold and kfold_only:
        return kfold
    heads = sorted(p for step in (helper.SINGLE_DIR, helper.MERGE_DIR)
                   for p in helper.result_files(model_dir / step, "*.keras"))
    best = [model_dir / helper.HYPEROPT_BEST] if (model_dir / helper.HYPEROPT_BEST).is_file() else []
    return ([] if kfold_only else kfold) + heads + best


def load_candidate(path: Path, args, test_ids: np.ndarray) -> Candidate:
    """A K-fold folder's oof.csv and test.csv, or a saved model's predictions of the valid and test rows."""
    data_dir = Path(args.data_dir)
    if path.is_dir():
        try:
            summary = json.loads((path / helper.KFOLD_SUMMARY).read_text())
            oof, test = pd.read_csv(path / helper.OOF_CSV), pd.read_csv(path / helper.TEST_CSV)
            oof, test = oof[["filename", "label", "fold", "prediction"]], test[["id", "prediction"]]
        except (OSError, ValueError, KeyError, pd.errors.ParserError) as e:  # missing, garbled or foreign files
            raise CatDogError(f"{path} is not a complete K-fold run ({type(e).__name__}: {str(e)[:120]}): rerun 03 or "
                              f"05 with --folds") from e
        if not isinstance(summary, dict):
            raise CatDogError(f"{path / helper.KFOLD_SUMMARY} is not a K-fold summary: rerun 03 or 05 with --folds")
        helper.check_split(path, {"split_sha256": summary.get("split_sha256", "unknown")}, data_dir)
        if args.tta:
            raise CatDogError(f"--tta: {path} is a K-fold model, whose stored test predictions have no views: "
                              f"drop --tta or leave it out of --blend")
        if set(test.id) != set(test_ids.tolist()):
            raise CatDogError(f"{path / helper.TEST_CSV} does not cover the test images on disk: retrain it")
        return Candidate(path.name, path, pd.Series(oof.prediction.to_numpy(), index=oof.filename.to_numpy()),
                         test.set_index("id").prediction.reindex(test_ids).to_numpy(), True)
    model, meta = helper.load_model(path)
    check_judgeable(path, meta)
    helper.check_split(path, meta, data_dir)
    feats, probs = helper.predict_saved(model, meta, path, data_dir, ("labelled", "test"), views=args.tta)
    if args.tta:
        probs = {part: tta_mean(probs[f"{part}_views"], args.tta_mean) for part in ("labelled", "test")}
    name = "hyperopt" if path.parent.name == helper.HYPEROPT_DIR else path.stem
    return Candidate(name, path, pd.Series(probs["labelled"][feats.valid], index=feats.files[feats.valid]),
                     pd.Series(probs["test"], index=feats.test_ids).reindex(test_ids).to_numpy(), False)


def check_judgeable(path: Path, meta: dict) -> None:
    """Refuse to judge one fold's model on the valid rows: most of them are in its training rows."""
    if meta.get("fold"):
        raise CatDogError(f"{path} is fold {meta['fold']} of a K-fold run, trained on most of split.csv's valid "
                          f"rows: give its folder {path.parent} (the mean of its folds, judged out of fold)")


def judged_rows(cands: list[Candidate], split: pd.DataFrame) -> tuple[np.ndarray, str]:
    """The file names every candidate is judged on: all out-of-fold rows when every candidate is K-fold (on the
    same rows), else split.csv's valid rows."""
    if all(c.oof for c in cands):
        rows = cands[0].judged.index
        for c in cands[1:]:
            if set(c.judged.index) != set(rows):
                raise CatDogError(f"{c.source} and {cands[0].source} were trained on different rows ({len(c.judged)} "
                                  f"and {len(rows)} out-of-fold rows): retrain them on the same split.csv")
        return rows.to_numpy(), "out-of-fold"
    rows = split.filename[split.subset == "valid"].to_numpy()
    for c in cands:
        missing = set(rows) - set(c.judged.index)
        if missing:
            raise CatDogError(f"{c.source} has no prediction for {len(missing)} valid rows (e.g. "
                              f"{sorted(missing)[0]}): it was trained on other rows; retrain it")
    return rows, "valid"


def tta_mean(views: np.ndarray, how: str = "prob") -> np.ndarray:
    """Combine (V, rows) per-view probabilities: their mean ('prob'), or the sigmoid of their logits' mean
    ('logit'; the probabilities are kept off 0 and 1 first, float32's sigmoid saturates there)."""
    views = np.asarray(views, np.float64)
    if how == "prob":
        return views.mean(axis=0)
    return 1 / (1 + np.exp(-helper.logit(views).mean(axis=0)))


def describe(meta: dict) -> str:
    """A sidecar in a few lines: what the model is, how it was trained, what it scored."""
    def flag(k, v):
        return f"--{k.replace('_', '-')}" + ("" if v is True else " " + (" ".join(map(str, v)) if isinstance(v, list)
                                                                          else str(v)))
    args = meta.get("args") or {}
    flags = " ".join(flag(k, v) for k, v in sorted(args.items())
                     if k != "verbose" and v is not None and v is not False)  # 0 is a setting
    saved = f" (weights of epoch {meta['saved_epoch']})" if meta.get("saved_epoch") else ""
    lines = [f"  kind {meta.get('kind')}, features {', '.join(meta.get('features', []))}, seed {meta.get('seed')}",
             f"  val_loss {meta.get('val_loss')}{saved}",
             f"  trained with: {flags or '(flags not recorded)'}"]
    for a in meta.get("feature_attrs") or []:
        lines.append("  features: " + ", ".join(f"{k}={a.get(k)}" for k in
                                                (f.name for f in dataclasses.fields(helper.ExtractSettings))))
    return "\n".join(lines)


def labelled_table(feats: helper.Features, probs: np.ndarray) -> pd.DataFrame:
    """The labelled rows with one model's predictions (its train rows too: they are ranked, never judged)."""
    return pd.DataFrame({"filename": feats.files, "label": feats.labels.astype(int), "prediction": probs,
                         "subset": np.where(feats.valid, "valid", "train")})


def train_image_id(name: str) -> str:
    """What names a labelled image in titles: Kaggle's id (`cat.123.jpg` -> '123'), else the file name's stem
    (an image of 01 --extra-data, `Abyssinian_1.jpg` -> 'Abyssinian_1')."""
    parsed = helper.parse_train_name(name)
    return str(parsed[1]) if parsed else Path(name).stem


def image_grid(rows: pd.DataFrame, data_dir: Path, path: Path, top: int) -> None:
    """The images of `rows` (filename, label, prediction), `top` at most, titled class_number_prediction."""
    from PIL import Image
    plt = helper.pyplot()
    cols = 5
    n = max(1, int(np.ceil(min(top, len(rows)) / cols)))
    fig, axes = plt.subplots(n, cols, figsize=(3 * cols, 3.2 * n), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, r in zip(axes.ravel(), rows.head(top).itertuples(), strict=False):  # grid may have spare cells
        with Image.open(data_dir / helper.TRAIN2 / CLASSES[r.label] / r.filename) as im:
            ax.imshow(helper.to_rgb(im))
        ax.set_title(f"{CLASSES[r.label]}_{train_image_id(r.filename)}_{r.prediction:.4f}", fontsize=9)
    helper.save_figure(fig, path)


def analyze(table: pd.DataFrame, data_dir: Path, out_dir: Path, top: int, clip,
            plain: np.ndarray | None = None) -> pd.DataFrame:
    """Rank the labelled rows of `table` (filename, label, prediction, subset) by |label - prediction|: worst.csv
    (top 100) and a grid of the top images. `plain`: the predictions without test-time augmentation, when the
    table's have it, to compare the two on the valid rows."""
    df = table.assign(error=np.abs(table.label - table.prediction))
    df = df.iloc[np.argsort(-df.error.to_numpy(), kind="stable")].reset_index(drop=True)
    helper.write_csv(df.head(100)[["filename", "label", "prediction", "error", "subset"]], out_dir / "worst.csv")
    image_grid(df, data_dir, out_dir / "worst.png", top)
    valid = (table.subset != "train").to_numpy()  # valid or out-of-fold: rows no model trained on
    yv = table.label.to_numpy()[valid]
    for what, p in ([("without TTA", plain), ("with TTA", table.prediction.to_numpy())] if plain is not None
                    else [("", table.prediction.to_numpy())]):
        pv = p[valid]
        log.info(f"val log loss{' ' + what if what else ''}: {log_loss(yv, pv):.5f} raw, "
                 f"{log_loss(yv, pv, clip):.5f} clipped to {clip}")
    return df


def suspects(table: pd.DataFrame, data_dir: Path, out_dir: Path, threshold: float | None, top: int, judged: str
             ) -> pd.DataFrame:
    """The judged rows (out-of-fold, else valid: never rows a model trained on) whose log loss is above
    `threshold` (default: the worst 0.2%, at least one): suspects.txt, in the format 01 --exclude reads, and
    suspects.png, for a person to review before excluding them."""
    p = np.clip(table.prediction.to_numpy(float), helper.LOG_EPS, 1 - helper.LOG_EPS)  # as log_loss guards log(0)
    loss = np.where(table.label.to_numpy() == 1, -np.log(p), -np.log(1 - p))
    df = table.assign(loss=loss).sort_values("loss", ascending=False, kind="stable").reset_index(drop=True)
    if threshold is None:
        picked = df.head(max(1, int(np.ceil(helper.SUSPECT_SHARE * len(df)))))
        why = f"the worst {100 * helper.SUSPECT_SHARE:g}% ({len(picked)} of {len(df)} {judged} rows)"
    else:
        picked = df[df.loss > threshold]
        why = f"{judged} log loss above {threshold} ({len(picked)} of {len(df)} rows)"
    lines = [f"# {why}, by 07_predict_submit.py --analyze: file name, then label, prediction and loss.",
             "# Look at each (suspects.png); delete the lines of correctly labelled pets, then exclude the rest with",
             f"#   01_reorganize_data.py --data-dir {shlex.quote(str(data_dir))} --exclude "
             f"{shlex.quote(str(out_dir / 'suspects.txt'))}  and retrain."]
    lines += [f"{r.filename}  # {CLASSES[r.label]}, P(dog) {r.prediction:.4f}, loss {r.loss:.3f}"
              for r in picked.itertuples()]
    with helper.atomic_path(out_dir / "suspects.txt") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    if len(picked):
        image_grid(picked, data_dir, out_dir / "suspects.png", top)
    log.info(f"wrote {out_dir / 'suspects.txt'}: {why}")
    return picked


# ----------------------------------------------------------------------------- Kaggle
# The credential check and error wording match 01's (--download).

# What competition_submit answers, instead of raising, when the upload itself failed.
KAGGLE_UPLOAD_FAILED = "Could not submit to competition"


def kaggle_submit(api, path: Path, message: str) -> str:
    """Upload the written and checked submission `path` with `message`; Kaggle's answer."""
    with helper.kaggle_call(f"submitting {path}"):
        answer = getattr(api.competition_submit(str(path), message, helper.KAGGLE_COMPETITION), "message", "") or ""
    if answer.startswith(KAGGLE_UPLOAD_FAILED):
        raise CatDogError(f"Kaggle did not take the upload of {path} ({answer}): the file is kept; rerun, or "
                          f"upload it at https://www.kaggle.com/c/{helper.KAGGLE_COMPETITION}/submissions")
    log.info(f"submitted {path} to {helper.KAGGLE_COMPETITION} as {message!r}: {answer or 'accepted'}; the score "
             f"appears at https://www.kaggle.com/c/{helper.KAGGLE_COMPETITION}/submissions")
    return answer


def cam_worst(worst: pd.DataFrame, model_path: Path, model_dir: Path, data_dir: Path, out_dir: Path) -> None:
    """Grad-CAM overlays of the worst images (where each backbone looked), from 08's export of this model."""
    export = model_dir / helper.EXPORT_DIR
    try:
        info = json.loads((export / helper.EXPORT_INFO).read_text())
    except (OSError, ValueError):
        info = {}
    if (info.get("source") != str(model_path.resolve()) or not (export / helper.EXPORT_KERAS).is_file()
            or info.get("source_sha256") != helper.file_sha256(model_path)):  # not retrained since
        q = shlex.quote
        log.info(f"no Grad-CAM overlays: {export} holds no export of {model_path} as it is now (run "
                 f"08_export_model.py --data-dir {q(str(data_dir))} --model-dir {q(str(model_dir))} --model "
                 f"{q(str(model_path))}, then --analyze again)")
        return
    if str(info.get("pixels", "")).startswith("encoder:"):
        log.info("no Grad-CAM overlays: the model reads foundation-encoder features (ViTs have no convolutional map)")
        return
    model = helper.load_keras(export / helper.EXPORT_KERAS)
    names = [b["backbone"] for b in info["backbones"]]
    for r in worst.itertuples():
        image = data_dir / helper.TRAIN2 / CLASSES[r.label] / r.filename
        pixels = helper.load_pixels(image, info["input_size"], info["interpolation"])
        cams = helper.grad_cam(model, pixels[None], [f"{n}_{helper.POOL_LAYER}" for n in names])[:, 0]
        helper.save_cam_overlay(pixels, cams, names, out_dir / f"{Path(r.filename).stem}.png",
                                title=f"{r.filename}: P(dog) {r.prediction:.4f}")
    log.info(f"wrote {len(worst)} Grad-CAM overlays of the worst images to {out_dir}/")


def known_labels(data_dir: Path, test_ids: np.ndarray) -> dict[int, int]:
    """--known-labels: test id -> the label of the labelled images (split.csv's) with exactly its pixels."""
    groups = helper.read_duplicates(data_dir)
    if groups is None:
        raise CatDogError(f"--known-labels: no {data_dir / helper.DUPLICATES_CSV}: rerun 01_reorganize_data.py, "
                          f"which finds the duplicates")
    split = helper.read_split(data_dir)
    known, conflicts = helper.known_test_labels(groups, dict(zip(split.filename, split.label, strict=True)))
    for name in conflicts:
        log.warning(f"--known-labels: test {name} equals labelled images of both classes: predicted by the model")
    ids = {helper.parse_test_name(n): label for n, label in known.items()}
    return {i: label for i, label in ids.items() if i in set(test_ids.tolist())}


def submit(args, data_dir: Path, output: Path, ids: np.ndarray, probs: np.ndarray, clip, info: dict | None = None
           ) -> pd.DataFrame:
    """Write the submission of `ids` (the laid-out test images): --known-labels first, then a row for each test
    entry 01 saw but could not use (--fill-unreadable P; refused without it), checked against every entry 01 saw;
    and <output stem>.json with `info` (the recipe) and what the two options did."""
    ids, probs, info = np.asarray(ids, np.int64), np.asarray(probs, float).copy(), dict(info or {})
    if args.known_labels:
        known = known_labels(data_dir, ids)
        at = {int(i): k for k, i in enumerate(ids)}
        for i, label in known.items():
            probs[at[i]] = label
        log.info(f"--known-labels: {len(known)} test images are exact copies of labelled ones: their training "
                 f"label is submitted (clipped to {clip})")
        info["known_labels"] = {"count": len(known), "ids": sorted(known)}
    unusable = helper.unusable_test_entries(data_dir)
    missing = {i: (n, why) for n, i, why in unusable if i is not None and i not in set(ids.tolist())}
    for n, _, why in (e for e in unusable if e[1] is None):
        log.warning(f"test entry {n} (01: {why}) stands for no test id: no row is written for it")
    if missing and args.fill_unreadable is None:
        shown = "; ".join(f"{n} ({why})" for n, why in list(missing.values())[:20])
        raise CatDogError(f"submission refused: {len(missing)} test entries 01 saw have no prediction, and Kaggle "
                          f"rejects a submission without every test id: {shown}{' ...' if len(missing) > 20 else ''}."
                          f" Fix or replace them and rerun 01 and 02, or pass --fill-unreadable P to submit P for them")
    if missing:
        log.warning(f"--fill-unreadable: {len(missing)} test entries 01 could not use get {args.fill_unreadable}: "
                    + ", ".join(n for n, _ in missing.values()))
        info["filled"] = {"value": args.fill_unreadable, "ids": sorted(missing)}
        ids = np.concatenate([ids, np.fromiter(missing, np.int64)])
        probs = np.concatenate([probs, np.full(len(missing), args.fill_unreadable)])
    expected = np.union1d(helper.laid_out_test_ids(data_dir), np.fromiter(missing, np.int64))
    sub = helper.write_submission(ids, probs, output, expected, clip,
                                  against="every test entry 01 saw" if unusable else "the test images on disk")
    if info:
        helper.write_json({**info, "args": vars(args)}, output.with_suffix(".json"))
    return sub


def submit_on_evidence(args, paths: list[Path], output: Path, data_dir: Path, model_dir: Path) -> pd.DataFrame:
    """--blend, --calibrate and --clip auto: fit the recipe on the candidates' honest predictions, report each
    stage's cross-fitted log loss, write the submission and <output stem>.json (and model/blend/results.csv)."""
    split, test_ids = helper.read_split(data_dir), helper.laid_out_test_ids(data_dir)
    cands = [load_candidate(p, args, test_ids) for p in paths]
    names = [c.name for c in cands]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        where = ", ".join(str(c.source) for c in cands if c.name in twice)
        raise CatDogError(f"--blend names {', '.join(twice)} more than once ({where}): blend models of different "
                          f"names")
    rows, judged = judged_rows(cands, split)
    y = split.set_index("filename").label.reindex(rows).to_numpy(float)
    preds = np.column_stack([c.judged.reindex(rows).to_numpy(float) for c in cands])
    clip = None if args.clip == "auto" else (args.clip_low, args.clip_high)
    calibrate = args.calibrate == "temperature"

    def fit(p, labels):
        return helper.fit_recipe(p, labels, calibrate, clip)

    recipe = fit(preds, y)
    smallest = int(min(y.sum(), len(y) - y.sum()))
    if smallest < 2:
        raise CatDogError(f"the {len(rows)} {judged} rows hold {smallest} image(s) of one class: too few to fit and "
                          f"judge --blend, --calibrate or --clip auto; use more data or a larger --valid-frac in 01")
    folds = helper.fold_assignment(y, min(args.blend_folds, smallest), args.seed)
    crossed, fitted = helper.cross_fit(preds, y, folds, fit), recipe.stages(preds)
    table = [{"model": c.name, "weight": w, "log_loss": log_loss(y, preds[:, i]), "fitted_log_loss": np.nan}
             for i, (c, w) in enumerate(zip(cands, recipe.weights, strict=True))]
    stages = {"blend": "blend", "calibrated": f"+ temperature {recipe.temperature:.3f}",
              "clipped": f"+ clip [{recipe.clip[0]:g}, {recipe.clip[1]:g}]"}
    for stage, label in stages.items():
        if stage != "calibrated" or calibrate:
            table.append({"model": label, "weight": np.nan, "log_loss": log_loss(y, crossed[stage]),
                          "fitted_log_loss": log_loss(y, fitted[stage])})
    table = pd.DataFrame(table).assign(rows=len(rows), judged_on=judged)
    log.info(f"\n{len(cands)} model(s) judged on {len(rows)} {judged} rows; log_loss of the blend's stages is "
             f"cross-fitted over {len(np.unique(folds))} folds (fitted_log_loss: fitted and judged on the same rows)\n"
             + table.drop(columns=["rows", "judged_on"]).to_string(index=False, float_format=lambda v: f"{v:.5f}"))
    if args.blend:
        helper.write_csv(table, model_dir / helper.BLEND_DIR / helper.RESULTS_CSV)
    test = recipe.stages(np.column_stack([c.test for c in cands]))["calibrated"]
    info = {"models": [str(c.source) for c in cands], "weights": dict(zip([c.name for c in cands],
                                                                          map(float, recipe.weights), strict=True)),
            "temperature": recipe.temperature, "clip": list(recipe.clip),
            "oof_log_loss": log_loss(y, crossed["clipped"]), "fitted_log_loss": log_loss(y, fitted["clipped"]),
            "judged_on": judged, "rows": len(rows)}
    sub = submit(args, data_dir, output, test_ids, test, recipe.clip, info)
    log.info(f"wrote {output.with_suffix('.json')}: weights {info['weights']}, temperature {recipe.temperature:.4f}, "
             f"clip {recipe.clip}, {judged} log loss {info['oof_log_loss']:.5f} (cross-fitted)")
    if args.analyze:
        out_dir = model_dir / helper.ANALYSIS_DIR
        # Unclipped (calibrated) predictions: clipping would give every confident mistake the same loss.
        rows_table = pd.DataFrame({"filename": rows, "label": y.astype(int), "prediction": crossed["calibrated"],
                                   "subset": judged})
        analyze(rows_table, data_dir, out_dir, args.top, recipe.clip)
        suspects(rows_table, data_dir, out_dir, args.suspect_loss, args.top, judged)
    return sub


def model_paths(args, model_dir: Path, evidence: bool) -> tuple[list[Path], str]:
    """The models this run reads (--blend's, --model, or the one chosen under --model-dir), and why."""
    if args.blend == ["auto"]:
        helper.check_model_dir(model_dir)
        paths = auto_models(model_dir)
        if not paths:
            raise CatDogError(f"--blend auto: no trained model under {model_dir}/: run 03 or 05 first")
        return paths, "--blend auto"
    if args.blend:
        helper.check_model_dir(model_dir)
        return list(dict.fromkeys(locate(t, model_dir) for t in args.blend)), "--blend"
    if args.model:
        return [Path(args.model)], "given by --model"
    path, why = helper.pick_model(model_dir)
    return [path], why


def check_run_outputs(args, output: Path, paths: list[Path], data_dir: Path, model_dir: Path, evidence: bool
                      ) -> None:
    """Refuse, before any work, outputs that would overwrite one another or what this run reads."""
    outputs = [(output, "--output")]
    if evidence:
        outputs.append((output.with_suffix(".json"), "the recipe (--output's name with .json)"))
    if args.blend:
        outputs.append((model_dir / helper.BLEND_DIR / helper.RESULTS_CSV, "--blend's table"))
    analysis = model_dir / helper.ANALYSIS_DIR
    if args.analyze:
        outputs += [(analysis / name, "--analyze's") for name in ("worst.csv", "worst.png", "suspects.txt",
                                                                   "suspects.png")]
        if not evidence:
            outputs.append((analysis / "cam", "--analyze's Grad-CAM folder"))
    inputs = {data_dir / helper.SPLIT_CSV: "the split", data_dir / helper.SPLIT_META: "the split's record",
              data_dir / helper.FEATURES: "the feature files", data_dir / helper.TRAIN2: "the labelled images",
              data_dir / helper.TEST2.parent: "the test images", model_dir / helper.EXPORT_DIR: "08's export"}
    inputs |= {model_dir / step / helper.RESULTS_CSV: "the results table"
               for step in (helper.SINGLE_DIR, helper.MERGE_DIR)}
    for p in paths:
        inputs |= {p: "the K-fold model"} if p.is_dir() else {p: "the model", p.with_suffix(".json"): "its sidecar"}
    helper.check_outputs(outputs, inputs)


def main(args):
    output = helper.check_writable_target(args.output)  # before any work: not a folder, device or FIFO
    if (args.known_labels or args.fill_unreadable is not None) and output.suffix == ".json":
        raise CatDogError(f"--output {output}: its record {output.with_suffix('.json')} would be the submission "
                          f"itself: give the submission a .csv name")
    if args.analyze:  # --analyze writes under --model-dir even with --model: refuse a file there before any work,
        helper.check_model_dir(Path(args.model_dir))  # not as a raw OSError after the submission was written
    # Credentials first: without them no work is done.
    api = helper.kaggle_api("--kaggle-submit") if args.kaggle_submit else None
    if api is not None:  # a read-only call: unaccepted rules (403) show now, not after predicting
        with helper.kaggle_call(f"checking access to {helper.KAGGLE_COMPETITION}"):
            api.competition_submissions(helper.KAGGLE_COMPETITION)
    data_dir, model_dir = Path(args.data_dir), Path(args.model_dir)
    out_dir = model_dir / helper.ANALYSIS_DIR
    kfold_model = args.model is not None and (Path(args.model) / helper.KFOLD_SUMMARY).is_file()
    evidence = bool(args.blend or args.calibrate != "none" or args.clip == "auto" or kfold_model)
    paths, why = model_paths(args, model_dir, evidence)
    check_run_outputs(args, output, paths, data_dir, model_dir, evidence)
    if evidence:
        sub = submit_on_evidence(args, paths, output, data_dir, model_dir)
    else:
        path = paths[0]
        model, meta = helper.load_model(path)
        log.info(f"model: {path} ({why})\n{describe(meta)}")
        if args.analyze:  # the judgements below are only honest on the valid rows of the model's own split
            check_judgeable(path, meta)
            helper.check_split(path, meta, data_dir)
        parts = ("labelled", "test") if args.analyze else ("test",)
        feats, probs = helper.predict_saved(model, meta, path, data_dir, parts, views=args.tta)
        plain = dict(probs)
        if args.tta:
            probs = {part: tta_mean(probs[f"{part}_views"], args.tta_mean) for part in parts}
            log.info(f"--tta: {args.tta_mean} mean over {len(plain['test_views'])} views")
        clip = (args.clip_low, args.clip_high)
        sub = submit(args, data_dir, output, feats.test_ids, probs["test"], clip)
        if args.analyze:
            table = labelled_table(feats, probs["labelled"])
            worst = analyze(table, data_dir, out_dir, args.top, clip, plain["labelled"] if args.tta else None)
            suspects(table[table.subset == "valid"], data_dir, out_dir, args.suspect_loss, args.top, "valid")
            cam_worst(worst.head(args.top), path, model_dir, data_dir, out_dir / "cam")
    if api is not None:
        kaggle_submit(api, output, args.kaggle_submit)
    return sub


if __name__ == "__main__":
    helper.run_cli(main, parse_args())
