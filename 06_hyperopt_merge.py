"""Step 6: HyperOpt TPE search over the merged head's SGD settings (not implemented yet)."""

import helper
from helper import CatDogError


def parse_args(argv=None):
    return helper.base_parser(__doc__.splitlines()[0], cnn=True).parse_args(argv)


def main(args):
    raise CatDogError("06_hyperopt_merge.py is not implemented yet (issue #6)")


if __name__ == "__main__":
    helper.run_cli(main, parse_args())
