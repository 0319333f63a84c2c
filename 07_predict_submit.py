"""Step 7: predict the test images with the best model and write the Kaggle submission.

By default the model is hyperopt's best if there is one, else the best merged model, else the best
single head (lowest val_loss in their results.csv). Predictions are clipped to [0.005, 0.995]: a
confident mistake costs far more log loss than confidence gains. --analyze shows the worst-predicted
labelled images, like the report's section IV, and where the model looked (08's export). --kaggle-submit
MESSAGE then uploads the checked submission to Kaggle (needs API credentials, checked before any work).
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

import helper
from helper import CLASSES, CatDogError, log


def parse_args(argv=None):
    p = helper.base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", help="a saved .keras model of any step, fine-tuned ones (model/finetune/) too "
                                   "(default: the best one found under --model-dir)")
    p.add_argument("--output", default="submissions/submission.csv", help="the submission CSV to write")
    helper.clip_args(p)
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
    if args.kaggle_submit is not None and not args.kaggle_submit.strip():
        p.error("--kaggle-submit is empty: give a message describing the submission, e.g. \"merged head, seed 2018\"")
    return args


def log_loss(y_true: np.ndarray, y_prob: np.ndarray, clip: tuple[float, float] | None = None) -> float:
    """Kaggle's binary log loss; with `clip`, predictions are first clipped as in the submission.

    Without `clip` it guards log(0) the way sklearn does (float64 machine epsilon).
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    eps = np.finfo(np.float64).eps
    lo, hi = clip if clip else (eps, 1 - eps)
    p = np.clip(p, lo, hi)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


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


def analyze(probs: np.ndarray, feats: helper.Features, data_dir: Path, out_dir: Path, top: int,
            clip) -> pd.DataFrame:
    """Rank the labelled images by |label - prediction|: worst.csv (top 100) and a grid of the top images."""
    from PIL import Image
    err = np.abs(feats.labels - probs)
    order = np.argsort(-err, kind="stable")
    df = pd.DataFrame({"filename": feats.files[order], "label": feats.labels[order].astype(int),
                       "prediction": probs[order], "error": err[order],
                       "subset": np.where(feats.valid[order], "valid", "train")})
    helper.write_csv(df.head(100), out_dir / "worst.csv")
    plt = helper.pyplot()
    cols = 5
    rows = max(1, int(np.ceil(min(top, len(df)) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, r in zip(axes.ravel(), df.head(top).itertuples(), strict=False):  # grid may have spare cells
        with Image.open(data_dir / helper.TRAIN2 / CLASSES[r.label] / r.filename) as im:
            ax.imshow(im.convert("RGB"))
        ax.set_title(f"{CLASSES[r.label]}_{helper.train_image_id(r.filename)}_{r.prediction:.4f}", fontsize=9)
    helper.save_figure(fig, out_dir / "worst.png")
    yv, pv = feats.labels[feats.valid], probs[feats.valid]
    log.info(f"val log loss: {log_loss(yv, pv):.5f} raw, {log_loss(yv, pv, clip):.5f} clipped to {clip}")
    return df


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
    export = model_dir / "export"
    try:
        info = json.loads((export / "export.json").read_text())
    except (OSError, ValueError):
        info = {}
    if (info.get("source") != str(model_path.resolve()) or not (export / "catdog.keras").is_file()
            or info.get("source_sha256") != helper.file_sha256(model_path)):  # not retrained since
        log.info(f"no Grad-CAM overlays: {export} holds no export of {model_path} as it is now (run "
                 f"08_export_model.py --data-dir {data_dir} --model-dir {model_dir} --model {model_path}, then "
                 f"--analyze again)")
        return
    model = helper.load_keras(export / "catdog.keras")
    names = [b["backbone"] for b in info["backbones"]]
    for r in worst.itertuples():
        image = data_dir / helper.TRAIN2 / CLASSES[r.label] / r.filename
        pixels = helper.load_pixels(image, info["input_size"], info["interpolation"])
        cams = helper.grad_cam(model, pixels[None], [f"{n}_avg_pool" for n in names])[:, 0]
        helper.save_cam_overlay(pixels, cams, names, out_dir / f"{Path(r.filename).stem}.png",
                                title=f"{r.filename}: P(dog) {r.prediction:.4f}")
    log.info(f"wrote {len(worst)} Grad-CAM overlays of the worst images to {out_dir}/")


def main(args):
    output = helper.check_writable_target(args.output)  # before any work: not a folder, device or FIFO
    if args.analyze:  # --analyze writes under --model-dir even with --model: refuse a file there before any work,
        helper.check_model_dir(Path(args.model_dir))  # not as a raw OSError after the submission was written
    # Credentials first: without them no work is done.
    api = helper.kaggle_api("--kaggle-submit") if args.kaggle_submit else None
    if api is not None:  # a read-only call: unaccepted rules (403) show now, not after predicting
        with helper.kaggle_call(f"checking access to {helper.KAGGLE_COMPETITION}"):
            api.competition_submissions(helper.KAGGLE_COMPETITION)
    path, why = (Path(args.model), "given by --model") if args.model else helper.pick_model(Path(args.model_dir))
    model, meta = helper.load_model(path)
    log.info(f"model: {path} ({why})\n{describe(meta)}")
    parts = ("labelled", "test") if args.analyze else ("test",)
    feats, probs = helper.predict_saved(model, meta, path, Path(args.data_dir), parts)
    clip = (args.clip_low, args.clip_high)
    sub = helper.write_submission(feats.test_ids, probs["test"], output, helper.laid_out_test_ids(args.data_dir),
                                  clip)
    if args.analyze:
        out_dir = Path(args.model_dir) / helper.ANALYSIS_DIR
        worst = analyze(probs["labelled"], feats, Path(args.data_dir), out_dir, args.top, clip)
        cam_worst(worst.head(args.top), path, Path(args.model_dir), Path(args.data_dir), out_dir / "cam")
    if api is not None:
        kaggle_submit(api, output, args.kaggle_submit)
    return sub


if __name__ == "__main__":
    helper.run_cli(main, parse_args())
