"""``moco-shard SRC OUT``: an image set as WebDataset tar shards that ``data.name=shards`` reads
(the writing, the layout and the manifest: ``data/shards/writer.py``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from moco_engine.config.schema import UserError
from moco_engine.data.shards.writer import write_shards
from moco_engine.tools.cli import run_guarded, with_version


def shard_main(argv: Sequence[str] | None = None) -> int:
    """``moco-shard``: bad input one line, exit 2 (``cli.run_guarded``)."""
    return run_guarded(main, argv)


def main(argv: list[str]) -> int:
    parser = with_version(argparse.ArgumentParser(prog="moco-shard", description=__doc__.splitlines()[0]))
    parser.add_argument("src", type=Path, help="an ImageFolder tree, or a .tar, .tar.gz or .tar.xz of one")
    parser.add_argument("out", type=Path, help="the folder to write (data.root of data.name=shards)")
    parser.add_argument("--shard-size", type=int, default=1000, help="items a shard (default 1000)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        raise UserError(f"moco-shard: --shard-size must be >= 1, not {args.shard_size}")
    manifest = write_shards(args.src, args.out, args.shard_size, progress=not args.quiet)
    for split, entry in manifest["splits"].items():
        print(f"{args.out / split}: {entry['items']} images in {len(entry['shards'])} shards")
    return 0
