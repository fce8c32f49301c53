"""Images/s of the engine's MoCo training step against a supervised step of the same backbone.

Inputs are random tensors already on the device (no data loading), so this measures the step
alone. Warm-up steps are not timed; the device is synchronised around every timed step and the
median is reported. Example (the BENCHMARKS.md row for CPU):

    python tools/bench_step.py --arch resnet18 --cifar-stem --batch 256 --queue 4096 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moco_engine.config import load_config
from moco_engine.encoders import build_backbone, split_bn
from moco_engine.engine import Trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds of ``step()`` over ``steps`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--cifar-stem", action="store_true")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--queue", type=int, default=4096)
    ap.add_argument("--bn-splits", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--no-channels-last", action="store_true")
    args = ap.parse_args()

    cfg = load_config([], [
        "data.name=synthetic", f"data.synthetic_size={args.batch}", "data.num_workers=0",
        f"model.arch={args.arch}", f"model.cifar_stem={args.cifar_stem}", f"model.bn_splits={args.bn_splits}",
        f"queue.size={args.queue}", f"optim.batch_size={args.batch}", f"train.device={args.device}",
        f"train.precision={args.precision}", f"train.channels_last={not args.no_channels_last}",
        "train.out_dir=runs/bench", "track.progress=false",
    ])
    trainer = Trainer(cfg)
    device = trainer.device
    fmt = trainer.memory_format
    x_q = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device).to(memory_format=fmt)
    x_k = torch.randn_like(x_q)
    idx = torch.arange(args.batch, device=device)
    moco = timed(lambda: trainer.train_step(x_q, x_k, idx), args.steps, args.warmup, device)

    # The same backbone trained supervised: forward + backward + SGD step on one view.
    backbone, width = build_backbone(args.arch, args.cifar_stem)
    backbone = split_bn(backbone, args.bn_splits) if args.bn_splits > 1 else backbone
    classifier = torch.nn.Sequential(backbone, torch.nn.Linear(width, 10)).to(device, memory_format=fmt)
    opt = torch.optim.SGD(classifier.parameters(), lr=0.1, momentum=0.9)
    labels = torch.randint(0, 10, (args.batch,), device=device)

    def supervised_step() -> None:
        with trainer._autocast():
            loss = F.cross_entropy(classifier(x_q).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sup = timed(supervised_step, args.steps, args.warmup, device)
    name = f"{args.arch}{' cifar-stem' if args.cifar_stem else ''} {args.image_size}px batch {args.batch} K {args.queue}"
    print(f"device: {device} ({torch.get_num_threads()} threads), precision: {trainer.amp_dtype or 'fp32'}, {name}")
    print("| step | ms (median) | images/s |")
    print("| --- | --- | --- |")
    print(f"| supervised | {sup * 1e3:.1f} | {args.batch / sup:.1f} |")
    print(f"| MoCo | {moco * 1e3:.1f} | {args.batch / moco:.1f} |")
    print(f"MoCo / supervised time ratio: {moco / sup:.2f}")


if __name__ == "__main__":
    main()
