"""Rebuild moco_engine/assets/cifar10_sample.tar.xz, the embedded default data set.

It copies, byte for byte, the first TRAIN_PER_CLASS train and TEST_PER_CLASS test JPEGs of each
class from the CIFAR-10 JPEG tarballs in ../shared/data (see its README for their origin), in the
same <split>/<class>/<file> layout. Run from the project root:

    python tools/make_embedded_sample.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100
OUT = Path(__file__).resolve().parents[1] / "moco_engine" / "assets" / "cifar10_sample.tar.xz"


def copy_split(src: Path, split: str, per_class: int, out: tarfile.TarFile) -> int:
    kept = 0
    with tarfile.open(src, "r:*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[0] == split and int(Path(parts[2]).stem) < per_class:
                info = tarfile.TarInfo("/".join(parts))
                info.size = member.size
                info.mtime = 0  # a reproducible archive
                out.addfile(info, io.BytesIO(tar.extractfile(member).read()))
                kept += 1
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default="../shared/data", type=Path)
    args = ap.parse_args()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(OUT, "w:xz", format=tarfile.GNU_FORMAT) as out:
        n_train = copy_split(args.shared / "cifar10-train-20k.tar.xz", "train", TRAIN_PER_CLASS, out)
        n_test = copy_split(args.shared / "cifar10-test.tar.xz", "test", TEST_PER_CLASS, out)
    print(f"wrote {OUT}: {n_train} train + {n_test} test images, {OUT.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
