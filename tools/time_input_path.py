"""Images decoded and augmented per second on one CPU core, by input path, from shards.

``moco-bench --data`` times the input path beside the training step on the machine's GPU; this
times the input path alone, in one process on one thread, so its figure is a core's:

- ``cpu``: ``data.decode=cpu``: PIL decodes, the recipe's PIL transforms make both views (what each
  loader process does);
- ``gpu``: ``data.decode=gpu``'s code with the CPU as the device: ``torchvision.io.decode_jpeg``
  (libjpeg-turbo) on the batch, then both views by ``augment.ragged_views`` (on a GPU, nvJPEG and
  the GPU's kernels do this; the loader processes only read bytes).

    python tools/time_input_path.py .data/imagenet-sample-shards --decode cpu
    python tools/time_input_path.py .data/imagenet-sample-shards --decode gpu

Prints images per second (two views each) over ``--batches`` batches after one untimed batch.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="moco-shard's folder")
    parser.add_argument("--decode", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--augmentation", default="moco_v2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from moco_engine.config.loading import load_config
    from moco_engine.data.loaders import build_loaders

    with tempfile.TemporaryDirectory() as folder:
        cfg = load_config([], ["data.name=shards", f"data.root={args.root}", "data.test_split=''",
                               f"data.decode={args.decode}", "data.pipeline=cpu", "data.num_workers=0",
                               f"data.augmentation={args.augmentation}", f"data.image_size={args.image_size}",
                               f"optim.batch_size={args.batch}", "train.device=cpu", f"train.out_dir={folder}"])
        loaders = build_loaders(cfg, torch.device("cpu"))
        batches = iter(loaders.train)
        next(batches)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(batches)
        seconds = time.perf_counter() - start
    images = args.batches * args.batch
    print(f"decode={args.decode}: {images / seconds:.1f} images/s on one core ({images} images of "
          f"{args.image_size} px views, two each, in {seconds:.1f} s)")


if __name__ == "__main__":
    main()
