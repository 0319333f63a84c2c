"""Step 4: split-block fine-tuning of ResNet50 on cached feature maps (not implemented yet)."""

import helper
from helper import CatDogError


def parse_args(argv=None):
    return helper.base_parser(__doc__.splitlines()[0], cnn=True).parse_args(argv)


def main(args):
    raise CatDogError("04_finetune_split.py is not implemented yet (issue #5)")


if __name__ == "__main__":
    helper.run_cli(main, parse_args())
