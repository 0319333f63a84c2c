"""Step 9: distil the ensemble into one small CNN trained end to end on the images (a phone-sized student).

Knowledge distillation (Hinton et al. 2015): a MobileNetV3 (or EfficientNetV2B0) learns from the labels and from
the teacher's probabilities. The teacher is any K-fold model or blend 07 can submit: a K-fold folder
(model/<step>/<name>_k<K>/) or the <stem>.json 07 wrote beside a blended submission. Its soft targets are honest:
a labelled row's target is the teacher's out-of-fold prediction, made by a model that did not train on that row.
The student trains on split.csv's train rows (augmented, as 04 --mode full) and is validated on its valid rows
with their true labels only; --pseudo adds the test images with the teacher's predictions as soft targets.

Per row the loss is (1 - alpha) * BCE(label, p) + alpha * T^2 * BCE(teacher_T, p_T), where x_T = sigmoid(logit(x)
/ T) (T^2 keeps the soft gradients' scale as T changes, as Hinton et al. do); a row with only one target (valid:
the label; pseudo: the teacher's) takes that term with weight 1. --alpha 0 trains on the hard labels only.
Writes model/student/<name>.keras (the best epoch's weights; its sidecar records every flag and the teacher),
results.csv (student and teacher val_loss on the same valid rows, their agreement, the student's KL to the
teacher before and after training), val_loss.png and TensorBoard runs under model/logs/student/<name>/.
08 exports the student (float16 and int8 TFLite among its formats).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import helper
from helper import CatDogError, log

ALPHA, TEMPERATURE = 0.7, 3.0  # within Hinton et al.'s ranges (alpha 0.5-0.9, T 2-4)
NO_TARGET = -1.0  # a target column's value where a row has no such target (valid rows: no soft one)


def parse_args(argv=None):
    p = helper.base_parser(__doc__.splitlines()[0], cnn=True)
    p.set_defaults(image_size=224)
    p.add_argument("--student", default=helper.STUDENTS[0], choices=helper.STUDENTS, help="the student network")
    p.add_argument("--teacher", required=True,
                   help="a K-fold folder (model/merge/<name>_k5/, with oof.csv and test.csv) or the <stem>.json "
                        "07 --blend wrote beside its submission (a blend of K-fold models)")
    p.add_argument("--name", help="the student's name: model/student/<name>.keras (default: the student network's "
                                  "name, + _hard with --alpha 0, + _pseudo with --pseudo)")
    p.add_argument("--alpha", type=helper.PROBABILITY, default=ALPHA,
                   help="weight of the soft (teacher) loss; 1 - alpha weighs the hard labels; 0: labels only")
    p.add_argument("--temperature", type=helper.POSITIVE, default=TEMPERATURE,
                   help="T on the logits of teacher and student in the soft loss (1: plain probabilities)")
    p.add_argument("--pseudo", action="store_true",
                   help="also train on the test images, with the teacher's test predictions as soft targets")
    helper.head_args(p, epochs=20, optimizer="sgd", sgd_lr=0.01)
    p.set_defaults(batch_size=32, dropout=0.2)  # MobileNetV3's own top uses dropout 0.2
    p.add_argument("--warmup-epochs", type=helper.NONNEGATIVE_INT, default=1,
                   help="head-only epochs first (a new head's first gradients would disturb pretrained features)")
    p.add_argument("--patience", type=helper.POSITIVE_INT, default=4,
                   help="early-stopping patience on val_loss (the best epoch's weights are kept)")
    p.add_argument("--interpolation", default="bilinear", choices=helper.INTERPOLATIONS, help="resize method")
    p.add_argument("--decoder", default="pil", choices=helper.DECODERS, help="image decoder (see 02)")
    args = helper.parse_head_args(p, argv)
    if args.name is not None and (not args.name.strip() or Path(args.name).name != args.name):
        p.error(f"--name {args.name!r}: give a plain file name, without folders")
    return args


# ----------------------------------------------------------------------------- the teacher's honest predictions

@dataclass(frozen=True)
class Teacher:
    source: Path
    kind: str          # "kfold" or "blend"
    oof: pd.Series     # file name -> P(dog), each by a model that did not train on that row
    test: np.ndarray   # P(dog) of the test images, in test id order

    def record(self) -> dict:
        """What the student's sidecar (and 08's export.json) say about the teacher."""
        summary = self.source / helper.KFOLD_SUMMARY if self.kind == "kfold" else self.source
        return {"source": str(self.source.resolve()), "kind": self.kind, "sha256": helper.file_sha256(summary)}


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), helper.LOGIT_EPS, 1 - helper.LOGIT_EPS)
    return np.log(p / (1 - p))


def tempered(p: np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T): the teacher's probabilities softened (T > 1) for the soft loss."""
    return 1 / (1 + np.exp(-logit(p) / temperature))


def kfold_teacher(path: Path, fingerprint: str, test_ids: np.ndarray, kind: str = "kfold") -> Teacher:
    try:
        _, oof, test = helper.read_kfold(path, fingerprint, test_ids)
    except CatDogError as e:
        raise CatDogError(f"--teacher: {e}") from e
    return Teacher(path, kind, pd.Series(oof.prediction.to_numpy(float), index=oof.filename.to_numpy(str)), test)


def blend_teacher(path: Path, model_dir: Path, fingerprint: str, test_ids: np.ndarray) -> Teacher:
    """07's recipe: its K-fold models' out-of-fold predictions, weighted and tempered as 07 submits them (before
    the clip, which only guards the submission). The weights and temperature were fitted on those rows' labels:
    a handful of numbers, against each model's thousands of weights that never saw the row."""
    recipe = helper.read_json(path)
    try:
        models, weights, temperature = recipe["models"], recipe["weights"], float(recipe["temperature"])
        judged = recipe["judged_on"]
    except (TypeError, KeyError, ValueError) as e:
        raise CatDogError(f"--teacher {path} is not the <stem>.json 07 writes beside a blended submission "
                          f"(no {e}): give that file, or a K-fold folder") from e
    if judged != "out-of-fold":
        raise CatDogError(f"--teacher {path}: its models were judged on split.csv's valid rows (single-split models, "
                          f"trained on the train rows): they have no honest prediction for the rows the student "
                          f"trains on; blend K-fold models (03/05 --folds K, then 07 --blend auto) and give that")
    root = model_dir.resolve()
    members = []
    for m in models:
        member = Path(m)
        if not member.resolve().is_relative_to(root):  # what a file names stays inside the models' folder
            raise CatDogError(f"--teacher {path} names {m}, outside --model-dir {model_dir}: run 09 with the "
                              f"--model-dir 07 blended from")
        members.append(kfold_teacher(member, fingerprint, test_ids))
    rows = members[0].oof.index
    blend = sum(weights[t.source.name] * t.oof.reindex(rows).to_numpy() for t in members)
    test = sum(weights[t.source.name] * t.test for t in members)
    if np.isnan(blend).any():
        raise CatDogError(f"--teacher {path}: its models were trained on different rows: rerun 07 --blend")
    return Teacher(path, "blend", pd.Series(tempered(blend, temperature), index=rows), tempered(test, temperature))


def load_teacher(spec: str, model_dir: Path, fingerprint: str, test_ids: np.ndarray) -> Teacher:
    path = Path(spec)
    if path.is_dir():
        return kfold_teacher(path, fingerprint, test_ids)
    if path.suffix in (".keras", ".json") and path.with_suffix(".keras").is_file():
        meta = helper.read_sidecar(path.with_suffix(".keras"))
        if meta.get("fold"):
            raise CatDogError(f"--teacher {path} is fold {meta['fold']} of a K-fold run: give its folder "
                              f"{path.parent} (each row predicted by the fold model that did not train on it)")
        raise CatDogError(f"--teacher {path} was trained on split.csv's train rows, so it has no honest prediction "
                          f"for the rows the student trains on: use a K-fold teacher (03/05 --folds K: give "
                          f"model/<step>/<name>_k<K>/, or 07 --blend's <stem>.json of K-fold models)")
    if path.suffix == ".json" and path.is_file():
        return blend_teacher(path, model_dir, fingerprint, test_ids)
    raise CatDogError(f"--teacher {spec}: not found, or not a K-fold folder or 07's <stem>.json")


# ----------------------------------------------------------------------------- the loss and the figures

def distillation_loss(alpha: float, temperature: float):
    """The loss on targets [hard, soft_T] per row (NO_TARGET where a row lacks one) and the student's P(dog)."""
    from keras import ops

    def bce(t, p):
        return -(t * ops.log(p) + (1 - t) * ops.log(1 - p))

    def distillation(y_true, y_pred):
        hard, soft = y_true[:, 0], y_true[:, 1]
        p = ops.clip(ops.reshape(y_pred, (-1,)), helper.LOGIT_EPS, 1 - helper.LOGIT_EPS)
        p_t = ops.clip(ops.sigmoid((ops.log(p) - ops.log(1 - p)) / temperature), helper.LOGIT_EPS,
                       1 - helper.LOGIT_EPS)
        has_hard, has_soft = hard >= 0, soft >= 0
        w_hard = ops.where(has_hard, ops.where(has_soft, 1 - alpha, 1.0), 0.0)
        w_soft = ops.where(has_soft, ops.where(has_hard, alpha, 1.0), 0.0)
        return w_hard * bce(hard, p) + w_soft * temperature ** 2 * bce(soft, p_t)

    return distillation


def kl(teacher: np.ndarray, student: np.ndarray) -> float:
    """Mean KL(teacher || student) of the two Bernoulli distributions per row, in nats."""
    t = np.clip(np.asarray(teacher, np.float64), helper.LOG_EPS, 1 - helper.LOG_EPS)
    s = np.clip(np.asarray(student, np.float64), helper.LOG_EPS, 1 - helper.LOG_EPS)
    return float(np.mean(t * np.log(t / s) + (1 - t) * np.log((1 - t) / (1 - s))))


def targets(split: pd.DataFrame, paths: dict, test_ids: np.ndarray, teacher: Teacher, temperature: float,
            pseudo: bool) -> dict:
    """The training rows (split.csv's train rows, + the test images with `pseudo`) and their targets [label,
    teacher_T], and the valid rows' [label, NO_TARGET]: the valid rows never train, and their teacher predictions
    only judge. Refused when the teacher lacks a valid row."""
    valid = (split.subset == "valid").to_numpy()
    files, labels = split.filename.to_numpy(str), split.label.to_numpy(np.float32)
    images = np.asarray(paths["labelled"])
    t_valid, t_train = teacher.oof.reindex(files[valid]).to_numpy(), teacher.oof.reindex(files[~valid]).to_numpy()
    if np.isnan(t_valid).any():
        raise CatDogError(f"--teacher {teacher.source} has no out-of-fold prediction for "
                          f"{int(np.isnan(t_valid).sum())} of split.csv's {int(valid.sum())} valid rows: it was "
                          f"trained on other rows; retrain it")
    if np.isnan(t_train).all():
        raise CatDogError(f"--teacher {teacher.source} has no out-of-fold prediction for split.csv's train rows")
    if np.isnan(t_train).any():  # rows 01 --extra-data added: K-fold trains on them but never holds them out
        log.info(f"{int(np.isnan(t_train).sum())} train rows have no out-of-fold prediction: labels only for them")
    soft = np.where(np.isnan(t_train), NO_TARGET, tempered(np.nan_to_num(t_train), temperature))
    train_x, train_y = images[~valid], np.column_stack([labels[~valid], soft])
    if pseudo:  # test rows: the teacher's prediction is their only target
        train_x = np.concatenate([train_x, paths["test"]])
        rows = np.column_stack([np.full(len(test_ids), NO_TARGET), tempered(teacher.test, temperature)])
        train_y = np.concatenate([train_y, rows])
    valid_y = np.column_stack([labels[valid], np.full(valid.sum(), NO_TARGET)])  # true labels only
    return {"valid": valid, "labels": labels, "images": images, "t_train": t_train, "t_valid": t_valid,
            "train_x": train_x, "train_y": train_y, "valid_y": valid_y}


def student_name(args) -> str:
    return args.name or args.student + ("_hard" if args.alpha == 0 else "") + ("_pseudo" if args.pseudo else "")


def main(args):
    bb = helper.get_backbone(args.student)
    data_dir, model_dir = Path(args.data_dir), Path(args.model_dir)
    split, paths, test_ids = helper.image_parts(data_dir)
    fingerprint = helper.split_fingerprint(data_dir)
    teacher = load_teacher(args.teacher, model_dir, fingerprint, test_ids)
    rows = targets(split, paths, test_ids, teacher, args.temperature, args.pseudo)
    valid, labels, images = rows["valid"], rows["labels"], rows["images"]
    t_train, t_valid = rows["t_train"], rows["t_valid"]
    train_x, train_y, valid_y = rows["train_x"], rows["train_y"], rows["valid_y"]
    log.info(f"teacher {teacher.source} ({teacher.kind}): training on {len(train_x)} rows ({int((~valid).sum())} "
             f"train" + (f" + {len(test_ids)} test" if args.pseudo else "") + f"), validating on {int(valid.sum())}")

    name = student_name(args)
    settings = helper.ExtractSettings(backbone=bb.name, image_size=args.image_size, interpolation=args.interpolation,
                                      decoder=args.decoder, weights=args.weights, seed=args.seed)
    config = helper.HeadConfig.of(vars(args))
    out = helper.Output(model_dir, helper.STUDENT_DIR, vars(args), fingerprint)
    meta = out.sidecar(config, backbone=bb.name, features=[], feature_attrs=[settings.attrs()],
                       teacher=teacher.record(), alpha=args.alpha, temperature=args.temperature, pseudo=args.pseudo)
    helper.set_seed(args.seed)  # the same initial network (and head) for every run of this seed
    base = bb.build(args.weights, args.image_size)  # to the pooled features, as 04's base
    model = helper.classifier(base, (args.image_size,) * 2 + (3,), "image", args.dropout, name)

    def predictions():
        return {part: helper.predict_images(model, images[rows], meta, args.batch_size)
                for part, rows in (("train", ~valid), ("valid", valid))}

    before = predictions()
    train, val = helper.image_data(train_x, train_y, images[valid], valid_y, settings, args.batch_size, args.seed)
    hist, saved_epoch = helper.fit_phases(model, base, base.layers, train, val, config, out.log_dir(name),
                                          args.warmup_epochs, args.patience,
                                          loss=distillation_loss(args.alpha, args.temperature), metrics=())
    # Saved with the plain loss on the labels: loading needs no custom code (Keras's safe mode refuses it), and
    # save_run's val_loss is the same BCE on the valid labels that early stopping watched.
    model.compile(config.make_optimizer(), "binary_crossentropy", metrics=["accuracy"])
    row = helper.save_run(name, model, hist, val.map(lambda x, y: (x, y[:, 0])), out.folder, meta, saved_epoch)
    after = predictions()
    row.update(teacher_val_loss=helper.log_loss(labels[valid], t_valid), teacher=str(teacher.source),
               agreement=float(np.mean((after["valid"] >= 0.5) == (t_valid >= 0.5))), alpha=args.alpha,
               temperature=args.temperature, pseudo=args.pseudo,
               kl_train_start=kl(t_train[~np.isnan(t_train)], before["train"][~np.isnan(t_train)]),
               kl_train_end=kl(t_train[~np.isnan(t_train)], after["train"][~np.isnan(t_train)]),
               kl_valid_start=kl(t_valid, before["valid"]), kl_valid_end=kl(t_valid, after["valid"]))
    log.info(f"{name}: val_loss {row['val_loss']:.5f} (teacher {row['teacher_val_loss']:.5f}), agrees with the "
             f"teacher on {100 * row['agreement']:.1f}% of the valid rows; KL to the teacher on the train rows "
             f"{row['kl_train_start']:.4f} -> {row['kl_train_end']:.4f}")
    return helper.write_results([row], out.folder, f"{bb.name} students: val_loss by epoch")


if __name__ == "__main__":
    helper.run_cli(main, parse_args())
