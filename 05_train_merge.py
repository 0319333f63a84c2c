"""Step 5: one head on the concatenated features of several backbones (the report's merged model).

One Input per backbone -> Concatenate -> Dropout(0.5) -> Dense(1, sigmoid), Adadelta, 7 epochs.
--combos runs the report's comparison: ResNet50+InceptionV3, ResNet50+Xception and all three.
Writes model/merge/<combo>.keras (with its sidecar), results.csv, val_loss.png and TensorBoard runs under
model/logs/merge/. --folds K trains K heads instead (model/merge/<combo>_k<K>/, see catdog/heads.py);
--params model/hyperopt/best.json trains with 06's best hyperparameters (e.g. K-fold: the report's final model).
--pseudo FILE --pseudo-min P adds the test rows an earlier round predicted confidently as training rows (never valid
or out-of-fold rows; catdog/pseudo.py says which FILE a K-fold run takes). --folds keeps each duplicate group of
data/duplicates.csv in one fold (--no-group-duplicates: not).
"""

import json
from pathlib import Path

import helper
from helper import CatDogError, log

REPORT_COMBOS = [("ResNet50", "InceptionV3"), ("ResNet50", "Xception"), ("ResNet50", "InceptionV3", "Xception")]


def parse_args(argv=None):
    p = helper.base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["ResNet50", "InceptionV3", "Xception"],
                   choices=list(helper.BACKBONES), metavar="MODEL", help="backbones whose features are merged")
    p.add_argument("--combos", action="store_true",
                   help="train the report's three combinations instead (those whose features exist)")
    helper.head_args(p, epochs=7)
    helper.views_arg(p)
    helper.kfold_args(p)
    p.add_argument("--params", metavar="JSON",
                   help="train with 06's best hyperparameters: its best.json (model/hyperopt/best.json) sets the "
                        "backbones, SGD with its learning rate, decay and momentum, the dropout, the batch size "
                        "the epochs of its best epoch and its --views")
    args = helper.parse_head_args(p, argv)
    if args.params and args.combos:
        p.error("--params gives one combination (06's backbones): drop --combos")
    if not args.combos and not args.params and len(set(args.models)) < 2:
        p.error("--models needs at least two different backbones to merge")
    return args


def apply_params(args) -> None:
    """Replace the head's settings by those of 06's best trial, read from its best.json (`--params`)."""
    path = Path(args.params)
    try:
        best = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CatDogError(f"--params {path}: not a readable JSON file ({type(e).__name__}): give the best.json "
                          f"06_hyperopt_merge.py wrote (model/hyperopt/best.json)") from e
    keys = ("features", "lr", "decay", "momentum", "dropout")
    trained = best.get("args") if isinstance(best, dict) else None
    try:
        if best.get("kind") != "hyperopt" or any(k not in best for k in keys) or not isinstance(trained, dict):
            raise ValueError
        models = [str(m) for m in best["features"]]
        lr, decay, momentum, dropout = (float(best[k]) for k in ("lr", "decay", "momentum", "dropout"))
        # The best trial's saved model is its best epoch's (kopt save_model='best'); an older best.json without
        # it: the epochs run less the early-stopping patience that followed the best one.
        epochs = int(best.get("best_epoch") or int(best["epochs"]) - int(trained.get("patience", 0)))
        batch_size, views = int(trained.get("batch_size", args.batch_size)), int(trained.get("views", 1))
    except (AttributeError, KeyError, TypeError, ValueError):
        raise CatDogError(f"--params {path}: not a best.json of 06_hyperopt_merge.py (it holds kind 'hyperopt', "
                          f"{', '.join(keys)}, epochs and args): give model/hyperopt/best.json") from None
    args.models, args.optimizer, args.lr, args.decay, args.momentum, args.dropout = (
        models, "sgd", lr, decay, momentum, dropout)
    args.epochs, args.batch_size, args.views = max(1, epochs), batch_size, max(args.views, views)
    log.info(f"--params {path}: {'+'.join(args.models)}, SGD lr {args.lr:.5f}, decay {args.decay:.5f}, momentum "
             f"{args.momentum}, dropout {args.dropout}, batch {args.batch_size}, {args.epochs} epochs"
             + (f", {args.views} views" if args.views > 1 else "")
             + f" (06's trial {best.get('trial')}: val_loss {best.get('val_loss')})")


def main(args):
    if args.params:
        apply_params(args)
    if args.combos:
        have = {n for n in helper.BACKBONES if helper.feature_file_state(helper.feature_path(args.data_dir, n))}
        combos = [c for c in REPORT_COMBOS if set(c) <= have]
        for c in REPORT_COMBOS:
            if c not in combos:
                log.info(f"skipped {'+'.join(c)}: no features for {', '.join(sorted(set(c) - have))}")
        if not combos:
            raise CatDogError("--combos: no combination of the report has all its feature files: run 02 first")
    else:
        combos = [tuple(dict.fromkeys(args.models))]
    config = helper.HeadConfig.of(vars(args))
    groups = helper.fold_groups(args.data_dir, not args.no_group_duplicates) if args.folds else None
    pseudo = (helper.pseudo_for(args.data_dir, args.pseudo, args.pseudo_min, args.pseudo_hard, args.folds, config.seed,
                                groups) if args.pseudo else None)
    out = helper.Output(Path(args.model_dir), helper.MERGE_DIR, vars(args), helper.split_fingerprint(args.data_dir))
    if pseudo:
        names = ["+".join(c) for c in combos]
        pseudo.refuse_outputs([out.folder / (helper.kfold_name(n, args.folds) if args.folds else f"{n}.keras")
                               for n in names])
    results = None
    for combo in combos:
        name = "+".join(combo)
        feats = helper.load_features(combo, args.data_dir, **config.feature_parts())
        if args.folds:
            row, _ = helper.train_kfold(name, feats, config, out, args.folds, helper.kaggle_rows(args.data_dir),
                                           groups, pseudo)
        else:
            _, row = helper.train_head(name, feats, config, out, pseudo)
        # Each row right after its model is saved, so results.csv always describes the models on disk.
        results = helper.write_results([row], out.folder, "merged features: val_loss of each saved model"
                                       + (" (K-fold rows: out-of-fold)" if args.folds else ""),
                                       show=combo == combos[-1])
    return results


if __name__ == "__main__":
    helper.run_cli(main, parse_args())
