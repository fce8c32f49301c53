"""``moco-shard SRC OUT``: an image set, or image–caption pairs, as WebDataset tar shards that
``data.name=shards`` reads (the writing, the layout and the manifest: ``data/shards/writer.py``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from moco_engine.config.schema import PairsDataConfig, UserError
from moco_engine.data.shards.writer import write_shards
from moco_engine.tools.cli import run_guarded, with_version


def shard_main(argv: Sequence[str] | None = None) -> int:
    """``moco-shard``: bad input one line, exit 2 (``cli.run_guarded``)."""
    return run_guarded(main, argv)


def main(argv: list[str]) -> int:
    parser = with_version(argparse.ArgumentParser(prog="moco-shard", description=__doc__.splitlines()[0]))
    parser.add_argument("src", type=Path, help="an ImageFolder tree, or a .tar, .tar.gz or .tar.xz of one; or pairs: "
                        "a folder or archive with a Karpathy-split JSON at its top, or a .csv/.tsv of images and captions")
    parser.add_argument("out", type=Path, help="the folder to write (data.root of data.name=shards)")
    parser.add_argument("--shard-size", type=int, default=1000, help="items a shard (default 1000)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    keys = PairsDataConfig()
    table = parser.add_argument_group("a .csv/.tsv of pairs (as data.pairs.* reads one)")
    table.add_argument("--image-key", default=keys.image_key, help=f"the image path's column (default {keys.image_key})")
    table.add_argument("--caption-key", default=keys.caption_key, help=f"the caption's column (default {keys.caption_key})")
    table.add_argument("--split-key", default=keys.split_key,
                       help=f"the split's column, if the file has one (default {keys.split_key})")
    table.add_argument("--split", default="train", help="the split of every row when the file has no split column "
                       "(default train)")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        raise UserError(f"moco-shard: --shard-size must be >= 1, not {args.shard_size}")
    keys = PairsDataConfig(image_key=args.image_key, caption_key=args.caption_key, split_key=args.split_key)
    manifest = write_shards(args.src, args.out, args.shard_size, progress=not args.quiet, keys=keys, split=args.split)
    what = "images and their captions" if manifest.get("captions") else "images"
    for split, entry in manifest["splits"].items():
        print(f"{args.out / split}: {entry['items']} {what} in {len(entry['shards'])} shards")
    return 0
