"""Full-size JPEGs for the shards path's tests and benchmarks, as an ImageFolder archive.

The public repository EliSchwartz/imagenet-sample-images holds one ImageNet validation image per
class (1,000 JPEGs, about 110 MB, most near 500 x 375 px; file names ``<wnid>_<class name>.JPEG``).
The images are ImageNet's (Deng et al. 2009), under ImageNet's terms of access (non-commercial
research and education); nothing of them is committed here. Fetch the repository with the search
tool, then write ``train/<wnid>/<file>`` into a tar archive (the first ``--count`` classes by wnid)
and shard it:

    fetch github:EliSchwartz/imagenet-sample-images
    python tools/make_imagenet_sample.py /work/.mirror/EliSchwartz+imagenet-sample-images/repo .data/imagenet-sample.tar
    moco-shard .data/imagenet-sample.tar .data/imagenet-sample-shards

The archive is the same bytes on every run (git's blobs in wnid order, times 0).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import tarfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("git_dir", type=Path, help="the bare git copy fetch brought")
    parser.add_argument("out", type=Path, help="the .tar to write")
    parser.add_argument("--count", type=int, default=1000, help="classes (one image each) to keep, in wnid order")
    args = parser.parse_args()
    git = ["git", "--git-dir", str(args.git_dir)]
    listing = subprocess.run([*git, "ls-tree", "HEAD"], capture_output=True, text=True, check=True).stdout.splitlines()
    files = sorted(line.split("\t", 1)[1] for line in listing if line.endswith(".JPEG"))[: args.count]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.out, "w") as out:
        for name in files:
            data = subprocess.run([*git, "show", f"HEAD:{name}"], capture_output=True, check=True).stdout
            info = tarfile.TarInfo(f"train/{name.split('_', 1)[0]}/{name}")
            info.size, info.mtime = len(data), 0
            out.addfile(info, io.BytesIO(data))
    print(f"{args.out}: {len(files)} images")


if __name__ == "__main__":
    main()
