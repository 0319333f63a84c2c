"""Step 7: predict the test images with the best model and write the Kaggle submission.

By default the model is hyperopt's best if there is one, else the best merged model, else the best
single head (lowest val_loss in their results.csv). Predictions are clipped to [0.005, 0.995]: a
confident mistake costs far more log loss than confidence gains. --analyze shows the worst-predicted
labelled images, like the report's section IV, and where the model looked (08's export). --kaggle-submit
MESSAGE then uploads the checked submission to Kaggle (needs API credentials, checked before any work).
Beyond the report: --tta averages feature views (02 --views); --blend, --calibrate temperature and --clip auto
fit weights, a temperature and the clip bound on out-of-fold (else valid) predictions, write <output stem>.json,
and with --analyze the suspects list model/analysis/suspects.txt.
"""

import dataclasses
import json
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
                        f"[{CLIP_GRID[0]}, {CLIP_GRID[-1]}] ([c, 1-c]) with the lowest out-of-fold (else valid) "
                        "log loss")
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


# ----------------------------------------------------------------------------- blend, calibrate, clip on evidence
# Every figure here is fitted and judged on honest predictions only: a K-fold model's out-of-fold predictions, or a
# single-split model's predictions of split.csv's valid rows. The log loss reported for a blend (and for the
# calibration and clip fitted after it) is cross-fitted: the judged rows are cut into --blend-folds folds and each
# fold's predictions come from weights, temperature and clip fitted on the other folds only.

CLIP_GRID = np.round(np.arange(0.001, 0.0505, 0.001), 3)  # --clip auto's candidates: 0.001 ... 0.05


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), helper.LOGIT_EPS, 1 - helper.LOGIT_EPS)
    return np.log(p / (1 - p))


def fit_blend(preds: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 (one per column of `preds`) minimising the blend's log loss."""
    from scipy.optimize import minimize
    k = preds.shape[1]
    if k == 1:
        return np.ones(1)
    result = minimize(lambda w: log_loss(y, preds @ w), np.full(k, 1 / k), method="SLSQP",
                      bounds=[(0, 1)] * k, constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                      options={"ftol": 1e-12, "maxiter": 500})
    w = np.clip(result.x, 0, None)
    return w / w.sum()


def scale_temperature(p: np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T): T > 1 softens overconfident predictions, T < 1 sharpens."""
    return 1 / (1 + np.exp(-logit(p) / temperature))


def fit_temperature(p: np.ndarray, y: np.ndarray) -> float:
    """The temperature (1/20 to 20) with the lowest log loss (Guo et al. 2017, one parameter)."""
    from scipy.optimize import minimize_scalar
    result = minimize_scalar(lambda t: log_loss(y, scale_temperature(p, np.exp(t))), bounds=(-3, 3),
                             method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


def auto_clip(p: np.ndarray, y: np.ndarray) -> float:
    """The bound c of CLIP_GRID whose clip to [c, 1 - c] gives the lowest log loss (the smallest on a tie)."""
    losses = [log_loss(y, p, (c, 1 - c)) for c in CLIP_GRID]
    return float(CLIP_GRID[int(np.argmin(losses))])


@dataclasses.dataclass
class Recipe:
    """What turns the models' predictions into the submitted ones: weights, then temperature, then clip."""
    weights: np.ndarray
    temperature: float
    clip: tuple[float, float]

    def stages(self, preds: np.ndarray) -> dict[str, np.ndarray]:
        """The predictions after each stage: 'blend', 'calibrated', 'clipped'."""
        blend = preds @ self.weights
        calibrated = scale_temperature(blend, self.temperature) if self.temperature != 1 else blend
        return {"blend": blend, "calibrated": calibrated, "clipped": np.clip(calibrated, *self.clip)}


def fit_recipe(preds: np.ndarray, y: np.ndarray, calibrate: bool, clip: tuple[float, float] | None) -> Recipe:
    """Fit the weights, then (`calibrate`) the temperature on the blend, then (`clip` None: auto) the clip."""
    weights = fit_blend(preds, y)
    temperature = fit_temperature(preds @ weights, y) if calibrate else 1.0
    if clip is None:
        c = auto_clip(Recipe(weights, temperature, (0, 1)).stages(preds)["calibrated"], y)
        clip = (c, 1 - c)
    return Recipe(weights, temperature, clip)


def cross_fit(preds: np.ndarray, y: np.ndarray, folds: np.ndarray, fit) -> dict[str, np.ndarray]:
    """Each stage's predictions of every row by a recipe `fit(preds, y)` fitted without the row's fold: the
    labels of a row never shape its own prediction."""
    out = {}
    for k in np.unique(folds):
        held = folds == k
        for stage, p in fit(preds[~held], y[~held]).stages(preds[held]).items():
            out.setdefault(stage, np.zeros(len(y)))[held] = p
    return out


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
    if (path.suffix == ".keras" and path.is_file()) or (path / helper.KFOLD_SUMMARY).is_file():
        return path
    if token == "hyperopt" and (model_dir / helper.HYPEROPT_BEST).is_file():
        return model_dir / helper.HYPEROPT_BEST
    for step in (helper.MERGE_DIR, helper.SINGLE_DIR):
        if (model_dir / step / token / helper.KFOLD_SUMMARY).is_file():
            return model_dir / step / token
        if (model_dir / step / f"{token}.keras").is_file():
            return model_dir / step / f"{token}.keras"
    known = [p.stem if p.suffix else p.name for p in auto_models(model_dir, kfold_only=False)]
    raise CatDogError(f"--blend {token}: no such model under {model_dir}/ (give a name from its results tables or a "
                      f"path); found: {', '.join(known) or 'none (train with 03, 05 or 06 first)'}")


def auto_models(model_dir: Path, kfold_only: bool = True) -> list[Path]:
    """--blend auto: every finished K-fold model, else (or with kfold_only False, also) every saved head."""
    kfold = sorted(p.parent for step in (helper.SINGLE_DIR, helper.MERGE_DIR)
                   for p in (model_dir / step).glob(f"*/{helper.KFOLD_SUMMARY}"))
    if kfold and kfold_only:
        return kfold
    heads = sorted(p for step in (helper.SINGLE_DIR, helper.MERGE_DIR) for p in (model_dir / step).glob("*.keras"))
    best = [model_dir / helper.HYPEROPT_BEST] if (model_dir / helper.HYPEROPT_BEST).is_file() else []
    return ([] if kfold_only else kfold) + heads + best


def load_candidate(path: Path, args, test_ids: np.ndarray, fingerprint: str) -> Candidate:
    """A K-fold folder's oof.csv and test.csv, or a saved model's predictions of the valid and test rows."""
    data_dir = Path(args.data_dir)
    if path.is_dir():
        _, oof, test = helper.read_kfold(path, fingerprint, test_ids)
        if args.tta:
            raise CatDogError(f"--tta: {path} is a K-fold model, whose stored test predictions have no views: "
                              f"drop --tta or leave it out of --blend")
        return Candidate(path.name, path, pd.Series(oof.prediction.to_numpy(), index=oof.filename.to_numpy()),
                         test, True)
    model, meta = helper.load_model(path)
    check_judgeable(path, meta)
    if "split_sha256" not in meta:  # saved before sidecars recorded it
        log.warning(f"{path}'s sidecar does not record its split: it is judged on the valid rows of today's "
                    f"{helper.SPLIT_CSV}, which is only honest if 01 was not rerun since it was trained")
    elif meta["split_sha256"] != fingerprint:
        raise CatDogError(f"{path} was trained on another split ({helper.SPLIT_CSV} changed since: 01 was rerun): "
                          f"retrain it, or leave it out of --blend")
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
    return 1 / (1 + np.exp(-logit(views).mean(axis=0)))


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
            ax.imshow(im.convert("RGB"))
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
             f"#   01_reorganize_data.py --data-dir {data_dir} --exclude {out_dir / 'suspects.txt'}  and retrain."]
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
        log.info(f"no Grad-CAM overlays: {export} holds no export of {model_path} as it is now (run "
                 f"08_export_model.py --data-dir {data_dir} --model-dir {model_dir} --model {model_path}, then "
                 f"--analyze again)")
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


def submit_on_evidence(args, output: Path, data_dir: Path, model_dir: Path) -> pd.DataFrame:
    """--blend, --calibrate and --clip auto: fit the recipe on the candidates' honest predictions, report each
    stage's cross-fitted log loss, write the submission and <output stem>.json (and model/blend/results.csv)."""
    helper.check_model_dir(model_dir)
    split, test_ids = helper.read_split(data_dir), helper.laid_out_test_ids(data_dir)
    if args.blend == ["auto"]:
        paths = auto_models(model_dir)
        if not paths:
            raise CatDogError(f"--blend auto: no trained model under {model_dir}/: run 03 or 05 first")
    elif args.blend:
        paths = list(dict.fromkeys(locate(t, model_dir) for t in args.blend))
    else:
        paths = [Path(args.model) if args.model else helper.pick_model(model_dir)[0]]
    fingerprint = helper.split_fingerprint(data_dir)
    cands = [load_candidate(p, args, test_ids, fingerprint) for p in paths]
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
        return fit_recipe(p, labels, calibrate, clip)

    recipe = fit(preds, y)
    smallest = int(min(y.sum(), len(y) - y.sum()))
    if smallest < 2:
        raise CatDogError(f"the {len(rows)} {judged} rows hold {smallest} image(s) of one class: too few to fit and "
                          f"judge --blend, --calibrate or --clip auto; use more data or a larger --valid-frac in 01")
    folds = helper.fold_assignment(y, min(args.blend_folds, smallest), args.seed)
    crossed, fitted = cross_fit(preds, y, folds, fit), recipe.stages(preds)
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
    sub = helper.write_submission(test_ids, test, output, test_ids, recipe.clip)
    info = {"models": [str(c.source) for c in cands], "weights": dict(zip([c.name for c in cands],
                                                                          map(float, recipe.weights), strict=True)),
            "temperature": recipe.temperature, "clip": list(recipe.clip),
            "oof_log_loss": log_loss(y, crossed["clipped"]), "fitted_log_loss": log_loss(y, fitted["clipped"]),
            "judged_on": judged, "rows": len(rows), "args": vars(args)}
    helper.write_json(info, output.with_suffix(".json"))
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


def main(args):
    output = helper.check_writable_target(args.output)  # before any work: not a folder, device or FIFO
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
    if args.blend or args.calibrate != "none" or args.clip == "auto" or kfold_model:
        sub = submit_on_evidence(args, output, data_dir, model_dir)
    else:
        path, why = (Path(args.model), "given by --model") if args.model else helper.pick_model(model_dir)
        model, meta = helper.load_model(path)
        log.info(f"model: {path} ({why})\n{describe(meta)}")
        if args.analyze:
            check_judgeable(path, meta)
        parts = ("labelled", "test") if args.analyze else ("test",)
        feats, probs = helper.predict_saved(model, meta, path, data_dir, parts, views=args.tta)
        plain = dict(probs)
        if args.tta:
            probs = {part: tta_mean(probs[f"{part}_views"], args.tta_mean) for part in parts}
            log.info(f"--tta: {args.tta_mean} mean over {len(plain['test_views'])} views")
        clip = (args.clip_low, args.clip_high)
        sub = helper.write_submission(feats.test_ids, probs["test"], output, helper.laid_out_test_ids(data_dir), clip)
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
