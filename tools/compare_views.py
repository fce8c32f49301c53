"""Compare the device path's views with the PIL recipe's, by distribution, on real images.

The device data path (``moco_engine/data/images/augment.py``) re-implements the torchvision/PIL view recipe
(``moco_engine.data.images.recipes.view_transform``) as batched tensor ops. This draws ``--views`` views of each
of the first ``--images`` images of an archive from both and prints, per view statistic
(``augment.view_statistics``), the mean and the 10/50/90% quantiles of each path:

    python tools/compare_views.py                      # the CIFAR-10 JPEG test split in ../shared/data
    python tools/compare_views.py --crop-only          # random resized crop and flip alone
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moco_engine.data.images.augment import random_views, view_statistics  # noqa: E402
from moco_engine.data.images.recipes import view_spec, view_transform  # noqa: E402
from moco_engine.data.images.sets import read_archive  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", default=str(ROOT.parent / "shared" / "data" / "cifar10-test.tar.xz"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--views", type=int, default=4, help="views of each image from each path")
    parser.add_argument("--preset", default="cifar")
    parser.add_argument("--size", type=int, default=32, help="the views' side in pixels")
    parser.add_argument("--crop-only", action="store_true", help="random resized crop and flip alone")
    args = parser.parse_args()

    data = read_archive(Path(args.archive), args.split)
    n = min(args.images, len(data))
    spec = view_spec(args.preset, args.size)
    pil = view_transform(args.preset, spec.size)
    if args.crop_only:
        spec = replace(spec, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
        pil = T.Compose([T.RandomResizedCrop(spec.size, scale=spec.scale), T.RandomHorizontalFlip(),
                         T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)

    torch.manual_seed(0)
    cpu = torch.stack([pil(data.load(i)) for _ in range(args.views) for i in range(n)]) * std + mean
    u8 = torch.from_numpy(np.stack(data.images[:n])).permute(0, 3, 1, 2)
    device = torch.cat([random_views(u8, spec, torch.Generator().manual_seed(v)) for v in range(args.views)]) * std + mean

    q = torch.tensor([0.1, 0.5, 0.9])
    print(f"{n} images x {args.views} views, preset {args.preset}{' (crop and flip only)' if args.crop_only else ''}")
    print("| statistic | PIL mean | device mean | PIL q10 / q50 / q90 | device q10 / q50 / q90 |")
    print("| --- | --- | --- | --- | --- |")
    theirs, ours = view_statistics(cpu), view_statistics(device)
    for name in theirs:
        a, b = theirs[name], ours[name]
        qa, qb = (" / ".join(f"{v:.4f}" for v in t.quantile(q).tolist()) for t in (a, b))
        print(f"| {name} | {a.mean():.4f} | {b.mean():.4f} | {qa} | {qb} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
