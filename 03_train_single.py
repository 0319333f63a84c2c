"""Step 3: the report's head on each backbone's features: Dropout(0.5) -> Dense(1, sigmoid), Adadelta, 10 epochs.

Trains on split.csv's train rows, validates on its valid rows. Writes model/single/<Model>.keras,
<Model>.history.csv, results.csv (the report's first table), val_loss.png, TensorBoard runs under
model/logs/single/<Model>/, and submissions/<Model>.csv.
"""

from pathlib import Path

import helper
from helper import CatDogError


def parse_args(argv=None):
    p = helper.base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(helper.BACKBONES), metavar="MODEL",
                   help="backbones to train on (default: every one with a feature file)")
    helper.head_args(p, epochs=10)
    p.add_argument("--predict", action=helper.argparse.BooleanOptionalAction, default=True,
                   help="also write submissions/<Model>.csv")
    p.add_argument("--submissions-dir", default="submissions", help="where the per-model CSVs go")
    p.add_argument("--clip-low", type=float, default=helper.CLIP[0], help="lowest probability submitted")
    p.add_argument("--clip-high", type=float, default=helper.CLIP[1], help="highest probability submitted")
    return p.parse_args(argv)


def main(args):
    names = args.models or [n for n in helper.BACKBONES
                            if helper.feature_file_state(helper.feature_path(args.data_dir, n))]
    if not names:
        raise CatDogError(f"no complete feature files in {Path(args.data_dir) / helper.FEATURES}: "
                          f"run 02_extract_features.py first")
    out_dir = Path(args.model_dir) / "single"
    rows = []
    for name in names:
        feats = helper.load_features([name], args.data_dir)
        optimizer = helper.make_optimizer(args.optimizer, args.lr, args.momentum, rho=args.rho)
        model = helper.build_head({name: feats.train[0].shape[1]}, args.dropout, optimizer)
        row, _ = helper.train_run(name, model, feats, out_dir, Path(args.model_dir) / "logs" / "single" / name,
                                  args, {"kind": "single", "optimizer": args.optimizer, "lr": args.lr,
                                         "dropout": args.dropout, "epochs": args.epochs})
        rows.append(row)
        if args.predict:
            helper.submit(model, feats, Path(args.submissions_dir) / f"{name}.csv", (args.clip_low, args.clip_high))
    return helper.write_results(rows, out_dir, "single backbones: val_loss after the last epoch")


if __name__ == "__main__":
    helper.run_cli(main, parse_args())
