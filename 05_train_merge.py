"""Step 5: one head on the concatenated features of several backbones (the report's merged model).

One Input per backbone -> Concatenate -> Dropout(0.5) -> Dense(1, sigmoid), Adadelta, 7 epochs.
--combos runs the report's comparison: ResNet50+InceptionV3, ResNet50+Xception and all three.
Writes model/merge/<combo>.keras (with its sidecar), results.csv, val_loss.png and TensorBoard runs under
model/logs/merge/.
"""

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
    args = helper.resolve_head_args(p.parse_args(argv))
    if not args.combos and len(set(args.models)) < 2:
        p.error("--models needs at least two different backbones to merge")
    return args


def main(args):
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
    out_dir = Path(args.model_dir) / helper.MERGE_DIR
    results = None
    for combo in combos:
        name = "+".join(combo)
        feats = helper.load_features(combo, args.data_dir, **helper.head_parts(args))
        _, row = helper.train_head(name, feats, args, helper.MERGE_DIR)
        # Each row right after its model is saved, so results.csv always describes the models on disk.
        results = helper.write_results([row], out_dir, "merged features: val_loss of each saved model",
                                       show=combo == combos[-1])
    return results


if __name__ == "__main__":
    helper.run_cli(main, parse_args())
