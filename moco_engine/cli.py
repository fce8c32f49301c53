"""Console entry points: parse arguments, load the config, call the library.

Expected errors (:class:`~moco_engine.config.UserError`: bad config, missing data, incompatible
checkpoint) become one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .config import UserError, load_config

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3  # the loss became NaN or infinite


def _guard(main: Callable[[list[str]], int], argv: Sequence[str] | None) -> int:
    try:
        return main(list(sys.argv[1:] if argv is None else argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Config files (``*.yaml``/``*.yml``) and ``key=value`` overrides, in their given order."""
    files = [a for a in args if a.endswith((".yaml", ".yml")) and "=" not in a]
    return files, [a for a in args if a not in files]


def _train(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="moco-train",
        description="MoCo pretraining. With no arguments: a short run on the CIFAR-10 sample shipped "
        "inside the package. Example: moco-train configs/experiment/cifar10_demo.yaml queue.size=8192",
    )
    parser.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                        help="YAML config files (merged in order), then key=value overrides")
    files, overrides = split_args(parser.parse_args(args).items)
    cfg = load_config(files, overrides)

    from .engine import (  # torch loads only once the config is valid
        NonFiniteLoss,
        StopRequested,
        train,
    )

    try:
        final = train(cfg)
    except StopRequested as stop:
        print(stop, file=sys.stderr)
        return 128 + stop.signum  # the shell's convention for "ended by signal N"
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    if "knn_top1" in final:
        print(f"kNN top-1: {final['knn_top1']:.2f}% after {final['epochs']} epochs ({cfg.train.out_dir})")
    return 0


def train_main(argv: Sequence[str] | None = None) -> int:
    """``moco-train [CONFIG.yaml ...] [key=value ...]``"""
    return _guard(_train, argv)


if __name__ == "__main__":
    sys.exit(train_main())
