"""Step 3: the report's head on each backbone's features: Dropout(0.5) -> Dense(1, sigmoid), Adadelta, 10 epochs.

Trains on split.csv's train rows, validates on its valid rows. Writes model/single/<Model>.keras (with its
sidecar <Model>.json), <Model>.history.csv, results.csv (the report's first table: val_loss of each saved
model), val_loss.png, TensorBoard runs under model/logs/single/<Model>/, and submissions/<Model>.csv.
--folds K trains K heads instead (catdog/heads.py, train_kfold): model/single/<Model>_k<K>/ and
submissions/<Model>_k<K>.csv.
--pseudo FILE --pseudo-min P adds the test rows an earlier round predicted confidently as training rows (never valid
or out-of-fold rows; catdog/pseudo.py says which FILE a K-fold run takes). --folds keeps each duplicate group of
data/duplicates.csv in one fold (--no-group-duplicates: not).
"""

import argparse
from pathlib import Path

import helper
from helper import CatDogError


def parse_args(argv=None):
    p = helper.base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(helper.BACKBONES), metavar="MODEL",
                   help="backbones to train on (default: every one with a feature file)")
    helper.head_args(p, epochs=10)
    helper.views_arg(p)
    helper.kfold_args(p)
    p.add_argument("--predict", action=argparse.BooleanOptionalAction, default=True,
                   help="also write submissions/<Model>.csv")
    p.add_argument("--submissions-dir", default="submissions", help="where the per-model CSVs go")
    helper.clip_args(p)
    args = helper.parse_head_args(p, argv)
    helper.clip_range(p, args)
    return args


def main(args):
    names = list(dict.fromkeys(args.models or [])) or [
        n for n in helper.BACKBONES if helper.feature_file_state(helper.feature_path(args.data_dir, n))]
    args.models = names  # resolved, so each sidecar's args name what this run trained
    if not names:
        raise CatDogError(f"no complete feature files in {Path(args.data_dir) / helper.FEATURES}: "
                          f"run 02_extract_features.py first")
    # Before the first model trains: every feature file (a missing one must not surface after the others are
    # retrained) and every submission target (a --submissions-dir that is a file must not fail after training).
    helper.load_features(names, args.data_dir, parts=())
    if args.views > 1:
        for name in names:  # each on its own: a single head needs only its own file's views
            helper.check_views([name], args.data_dir, args.views)
    stems = [helper.kfold_name(n, args.folds) if args.folds else n for n in names]  # each run's results row
    if args.predict:
        for stem in stems:
            helper.check_writable_target(Path(args.submissions_dir) / f"{stem}.csv")
    config = helper.HeadConfig.of(vars(args))
    groups = helper.fold_groups(args.data_dir, not args.no_group_duplicates) if args.folds else None
    pseudo = (helper.pseudo_for(args.data_dir, args.pseudo, args.pseudo_min, args.pseudo_hard, args.folds, config.seed,
                                groups) if args.pseudo else None)
    out = helper.Output(Path(args.model_dir), helper.SINGLE_DIR, vars(args), helper.split_fingerprint(args.data_dir))
    if pseudo:
        pseudo.refuse_outputs([out.folder / (s if args.folds else f"{s}.keras") for s in stems]
                              + ([Path(args.submissions_dir) / f"{s}.csv" for s in stems] if args.predict else []))
    results = None
    for name in names:
        feats = helper.load_features([name], args.data_dir, **config.feature_parts())
        if args.folds:
            row, test = helper.train_kfold(name, feats, config, out, args.folds, helper.kaggle_rows(args.data_dir),
                                           groups, pseudo)
        else:
            model, row = helper.train_head(name, feats, config, out, pseudo)
            test = feats.predict(model, "test")
        # Each row right after its model is saved, so results.csv always describes the models on disk.
        results = helper.write_results([row], out.folder, "single backbones: val_loss of each saved model"
                                       + (" (K-fold rows: out-of-fold)" if args.folds else ""), show=name == names[-1])
        if args.predict:
            helper.write_submission(feats.test_ids, test, Path(args.submissions_dir) / f"{row['model']}.csv",
                                    helper.laid_out_test_ids(args.data_dir), (args.clip_low, args.clip_high))
    return results


if __name__ == "__main__":
    helper.run_cli(main, parse_args())
