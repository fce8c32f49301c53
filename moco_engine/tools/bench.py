"""``moco-bench``: images/s (tokens/s for text) of the engine's MoCo step against a supervised
step, in one process.

For a named case (method, backbone, image size or token width, batch, K) it times, on inputs
already in device memory (random images; random token ids, every position attended):

- a supervised step of the same backbone and batch (forward, cross-entropy, backward, SGD; AdamW
  for text, as fine-tuning a transformer uses); for a method of two towers (``MethodEntry.pairs``:
  image–text contrast), each tower's supervised step on its own input, one after the other;
- the engine's step (``Trainer.train_step``): MoCo v1/v2's ``moco.moco_step`` (query and key
  passes, logits, backward, SGD, EMA, enqueue), MoCo v3's ``moco_v3.moco_v3_step`` (both views
  through f_q and its predictor and through f_k, the symmetric loss, backward, the optimizer, EMA)
  or ITC's ``itc.itc_step`` (images and captions through both towers and their momentum copies,
  the two queues, backward, the optimizer, EMA, enqueue);
- the pieces MoCo adds, each alone: the key encoder's forward, the EMA, and for v1/v2 shuffle-BN's
  permutation, the queue logits (forward and backward) and the enqueue.

Each case has a floor: the least a step can cost in supervised steps of one view at the same
batch, counting a forward pass as a third of a forward-backward. MoCo v1/v2 (one query
forward-backward, one key forward): 4/3. MoCo v3 (two views through f_q forward and backward, two
through f_k forward): 8/3. ITC (each tower forward and backward, its momentum copy forward) against
the two towers' supervised steps together: 4/3. The table reports the measured ratio against it.

A pairs case trains on a generated Karpathy-split folder (``bench_setup.pairs_folder``: one-colour images,
captions of random words, under ``runs/bench``), which gives the run its tokenizer; the step's
inputs are random tensors as for the other cases.

Each figure is the median of ``--repeats`` timed calls after ``--warmup`` untimed ones, with the
device synchronised around every call; the supervised and MoCo steps are timed in alternation and
their ratio is the median of the per-round ratios, so a drifting machine moves both alike.
``--data`` adds the real input path (decode, augment, transfer) alone and together with the step,
to show whether loading limits training.

Eager cases also count the operators each step dispatches (forward and backward, :mod:`opcount`):
a launch-bound GPU step's time grows with that count, which any CPU measures. ``--ops`` only
counts, nothing timed: the supervised step and the MoCo step with each split-BN form and with
plain BatchNorm, on the case's model at a small batch (seconds on a CPU, even for r18-cifar).

    moco-bench r18-cifar                      # the MoCo CIFAR-10 demo's step
    moco-bench r18-cifar --data --data-root ../shared/data/cifar10_train_20k.tar.gz
    moco-bench r50-224 --data --data-root .data/imagenette-shards --workers 8 --decode gpu   # shards, decoded on the GPU
    moco-bench tiny --device cpu              # seconds on a laptop
    moco-bench vit-t-cifar --device cpu --batch 32   # MoCo v3, ViT-Tiny/4, at a CPU's batch
    moco-bench r18-cifar --ops --device cpu   # operators per step, by split-BN form
    moco-bench r18-cifar --cuda-graphs        # the encoders' passes replayed as CUDA graphs
    moco-bench bert-scifact --device cpu      # text: the SciFact recipe's BERT step
    moco-bench itc-flickr-cpu --device cpu    # image–text contrast against both towers' supervised steps
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from moco_engine.config.rules import CHOICES, DEVICE
from moco_engine.config.schema import UserError
from moco_engine.method.norms import SplitBatchNorm
from moco_engine.runtime.batches import View, batch_size, to_device
from moco_engine.runtime.precision import autocast
from moco_engine.tools.bench_cases import CASES, Case
from moco_engine.tools.bench_setup import (
    build_trainer,
    step_inputs,
    supervised_step,
    text_vocab,
    two_towers,
)
from moco_engine.tools.cli import with_version
from moco_engine.tools.opcount import count_ops, step_counters
from moco_engine.tools.report import case_table
from moco_engine.tools.timing import median_seconds, paired_medians, peak_memory, profile, sync

#: How the tables name each built-in method's step (another's: its name).
LABELS = {"moco": "MoCo", "moco_v3": "MoCo v3", "byol": "BYOL", "itc": "ITC"}


def breakdown(trainer, views: tuple[View, ...], idx, repeats: int, warmup: int) -> dict[str, float]:
    """Seconds of each piece MoCo adds to a supervised step, timed alone. ``views``: f_k's
    inputs (the key view; for two towers, the images and captions)."""
    from moco_engine.method.losses import info_nce, info_nce_logits
    from moco_engine.runtime import distributed as dist

    device, cfg = trainer.device, trainer.cfg
    x = views[-1]
    b, dim = batch_size(x), cfg.model.dim
    q = F.normalize(torch.randn(b, dim, device=device), dim=1).requires_grad_()
    k = F.normalize(torch.randn(b, dim, device=device), dim=1)

    def key_forward():
        with torch.no_grad(), autocast(device, trainer.amp_dtype):
            trainer.encoder_k(*views)

    def shuffle():
        shuffled, restore = dist.shuffle_batch(x)
        return restore(k)

    def queue_logits():
        neg = trainer.negatives.negatives(q, k, idx)
        with autocast(device, trainer.amp_dtype):
            loss = info_nce(info_nce_logits(q, k, neg.embeddings, cfg.loss.temperature, neg.drop))
        loss.backward()

    def enqueue():
        trainer.negatives.update(k, idx)

    pieces = {
        "key forward": key_forward,
        "EMA": lambda: trainer.encoder_k.update(trainer.encoder_q, 0.99),
    }
    if cfg.method == "moco":  # v3 has no shuffle and its negatives are the batch's keys
        pieces |= {"shuffle": shuffle, "queue logits": queue_logits, "enqueue": enqueue}
    return {name: median_seconds(fn, repeats, warmup, device) for name, fn in pieces.items()}


def data_path(trainer, steps: int, warmup: int) -> dict[str, float]:
    """Seconds per batch of the input path alone, and of input path plus step (loader order)."""
    device = trainer.device

    def batches():
        epoch = trainer.epoch  # the run's own count stays (a property of its progress)
        while True:
            trainer.loaders.sampler.set_epoch(epoch)
            for (x_q, x_k), _, idx in trainer.loaders.train:
                yield (to_device(x_q, device, trainer.memory_format), to_device(x_k, device, trainer.memory_format),
                       idx.to(device, non_blocking=True))
            epoch += 1

    def timed_loop(work: Callable) -> float:
        it = batches()
        for _ in range(warmup):
            work(*next(it))
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            work(*next(it))
        sync(device)
        return (time.perf_counter() - start) / steps

    # Enough batches to drain what the loader's workers prefetched during the warm-up, so the
    # figure is the input path's sustained rate, not the emptying of its queue.
    steps = max(steps, 8 * trainer.cfg.data.num_workers)
    alone = timed_loop(lambda *batch: None)
    with_step = timed_loop(trainer.train_step)
    return {"data": alone, "data + step": with_step}


def run_case(name: str, args: argparse.Namespace) -> dict:
    """Measure one case; returns every figure (seconds, GiB, images/s) as a dict."""
    case = CASES[name]
    if args.bn_splits:
        case = replace(case, bn_splits=args.bn_splits)
    if args.queue:
        case = replace(case, queue=args.queue)
    if args.batch:
        case = replace(case, batch=args.batch)
    if args.ops:
        return {"case": name, **asdict(case), "pairs": two_towers(case), "ops_by_form": form_op_counts(case, args)}
    trainer = build_trainer(case, args)
    device = trainer.device
    x_q, x_k = step_inputs(trainer, case)
    idx = torch.arange(case.batch, device=device)
    labels = torch.randint(0, 1000, (case.batch,), device=device)
    pairs = two_towers(case)
    text_params = (trainer.cfg.text_model if pairs else trainer.cfg.model).params

    sup_fn = supervised_step(trainer, case, (x_q, x_k), labels)
    moco_fn = lambda: trainer.train_step(x_q, x_k, idx)  # noqa: E731
    supervised_s, moco_s, ratio = paired_medians(sup_fn, moco_fn, args.repeats, args.warmup, device)
    result = {
        "case": name, **asdict(case), "device": str(device), "label": LABELS.get(case.method, case.method),
        "pairs": pairs, "vocab": text_vocab(trainer) if case.tokens else 0,
        "encoder": (f"{' + bert' if pairs else ''} ({text_params['layers']} layers x {text_params['hidden']})"
                    if case.tokens else ""),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "precision": str(trainer.amp_dtype or "fp32").replace("torch.", ""), "compile": trainer.cfg.train.compile,
        "cuda_graphs": trainer.cfg.train.cuda_graphs,
        "split_bn": SplitBatchNorm.resolve_form(args.split_bn, device),  # what "auto" meant here
        "supervised_s": supervised_s,
        "supervised_peak_gib": peak_memory(device, sup_fn),
        "moco_s": moco_s,
        "moco_peak_gib": peak_memory(device, moco_fn),
        "ratio": ratio, "repeats": args.repeats,  # the median of paired ratios, not the ratio of medians
        "floor": case.floor,
    }
    result["breakdown_s"] = breakdown(trainer, (x_q, x_k) if pairs else (x_k,), idx, args.repeats, args.warmup)
    eager = not (trainer.cfg.train.compile or trainer.cfg.train.cuda_graphs)  # compiled kernels are no ATen ops
    result["ops"] = {"supervised": count_ops(sup_fn, step_counters(*sup_fn.optimizers)).as_dict(),
                     "moco": count_ops(moco_fn, step_counters(trainer.optimizer)).as_dict()} if eager else None
    if args.data:
        result["data_s"] = data_path(trainer, args.repeats, args.warmup)
    if args.profile:
        result["profile"] = profile(moco_fn, device)
    return result


def form_op_counts(case: Case, args: argparse.Namespace) -> dict[str, dict]:
    """The operators one eager step dispatches, and its host reads: the supervised step, then
    the MoCo step with plain BatchNorm ("plain") and with each split-BN form, on ``case``'s
    model at a batch of 8 samples per slice (the counts do not grow with the batch: every form's
    operators are per layer and per slice, not per sample; a text case at its own batch). Each step runs once before it is counted (the first
    call makes the optimizer's momentum buffers)."""
    splits = max(case.bn_splits, 2)
    # A text case at its own batch: length buckets cut the batch into groups, so there the
    # batch decides how many encoder calls a step makes.
    small = case if case.tokens else replace(case, batch=8 * splits, queue=min(case.queue, 1024))
    eager = {**vars(args), "compile": False, "cuda_graphs": False, "data": False}
    counts = {}
    # Split-BN is MoCo v1/v2's (shuffle-BN's companion); MoCo v3 and BYOL keep plain (or synchronised) BN.
    forms = ("plain",) if case.method != "moco" or case.tokens else ("plain", *(f for f in SplitBatchNorm.FORMS if f != "auto"))
    for form in forms:
        variant = replace(small, bn_splits=1 if form == "plain" else splits)
        trainer = build_trainer(variant, argparse.Namespace(**{**eager, "split_bn": "auto" if form == "plain" else form}))
        x_q, x_k = step_inputs(trainer, variant)
        idx = torch.arange(variant.batch, device=trainer.device)
        steps = {"moco": (partial(trainer.train_step, x_q, x_k, idx), [trainer.optimizer])}
        if form == "plain":
            labels = torch.randint(0, 1000, (variant.batch,), device=trainer.device)
            supervised = supervised_step(trainer, variant, (x_q, x_k), labels)
            steps = {"supervised": (supervised, supervised.optimizers), **steps}
        for step_name, (step, optimizers) in steps.items():
            step()
            method = LABELS.get(case.method, case.method)
            row = "supervised" if step_name == "supervised" else f"{method}, {form if form == 'plain' else 'split-BN ' + form}"
            counted = count_ops(step, ignore_reads_of=step_counters(*optimizers))
            counts[row] = {"batch": variant.batch, "bn_splits": variant.bn_splits, **counted.as_dict()}
    return counts


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse, in one line naming the option, what argparse's types let through.

    Raises:
        UserError: a count out of range, an unknown pipeline or precision, a --json path
            whose folder does not exist (found before minutes of timing, not after).
    """
    rules = [
        (args.repeats >= 1, "--repeats", args.repeats, "must be >= 1 (the median of that many timed calls)"),
        (args.warmup >= 0, "--warmup", args.warmup, "must be >= 0"),
        (args.workers >= 0, "--workers", args.workers, "must be >= 0"),
        (args.bn_splits >= 0, "--bn-splits", args.bn_splits, "must be >= 0 (0 = the case's own)"),
        (args.queue >= 0, "--queue", args.queue, "must be >= 0 (0 = the case's own)"),
        (args.batch >= 0, "--batch", args.batch, "must be >= 0 (0 = the case's own)"),
        (args.pipeline in ("cpu", "device"), "--pipeline", args.pipeline, "must be cpu or device"),
        (args.decode in CHOICES["data.decode"], "--decode", args.decode, "must be cpu or gpu"),
        (args.precision in CHOICES["train.precision"], "--precision", args.precision,
         f"must be one of {', '.join(CHOICES['train.precision'])}"),
        (DEVICE.match(args.device) is not None, "--device", args.device, "not a device (auto, cpu, cuda or cuda:N)"),
        (not args.json or Path(args.json).expanduser().resolve().parent.is_dir(), "--json", args.json,
         "its folder does not exist"),
    ]
    for ok, option, value, rule in rules:
        if not ok:
            raise UserError(f"moco-bench {option} {value}: {rule}")


def bench_parser() -> argparse.ArgumentParser:
    """``moco-bench``'s options (the proof kit's tests check its command lines with it)."""
    parser = argparse.ArgumentParser(prog="moco-bench", description=__doc__.splitlines()[0])
    with_version(parser)
    parser.add_argument("cases", nargs="*", default=["r18-cifar"], help=f"one or more of: {', '.join(CASES)}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay both models' passes as CUDA graphs (train.cuda_graphs; CUDA only)")
    parser.add_argument("--queue", type=int, default=0, help="override the case's queue size K")
    parser.add_argument("--batch", type=int, default=0, help="override the case's batch (a CPU's smaller one)")
    parser.add_argument("--ops", action="store_true",
                        help="only count operators per step (supervised; MoCo with plain BN and each split-BN form)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--data", action="store_true", help="also time the real input path")
    parser.add_argument("--data-root", default="",
                        help="--data: an image folder or .tar archive, or moco-shard's folder (default: the embedded sample)")
    parser.add_argument("--decode", default="cpu",
                        help="--data: cpu (PIL in the loader) | gpu (the loader sends JPEG bytes, the device decodes: shards)")
    parser.add_argument("--pipeline", default="cpu", help="--data: cpu (loader workers) | device (augmented on the device)")
    parser.add_argument("--workers", type=int, default=4, help="--data: loader processes of the cpu pipeline")
    parser.add_argument("--bn-splits", type=int, default=0, help="override the case's split-BN slices (1 = plain BN)")
    parser.add_argument("--split-bn", default="auto", choices=SplitBatchNorm.FORMS,
                        help="split-BN's form: one native batch_norm per slice, one pass of reductions and a "
                        "scale-and-shift, one native batch_norm over a strided (N/s, s*C, H, W) view, or one "
                        "native group norm over a channels_last batch's (s, C, N/s, H, W) view "
                        "(model.bn_split_form; auto: per_slice on CPU, grouped on GPUs: the fewest operators)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's table of the MoCo step")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    return parser


def _bench(argv: list[str]) -> int:
    args = bench_parser().parse_args(argv)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        raise UserError(f"unknown benchmark case {unknown[0]!r}; choose from {', '.join(CASES)}")
    check_arguments(args)
    results = []
    for name in args.cases:
        results.append(run_case(name, args))
        print(case_table(results[-1]) + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def bench_main(argv: Sequence[str] | None = None) -> int:
    """``moco-bench [CASE ...] [options]``"""
    from moco_engine.tools.cli import run_guarded

    return run_guarded(_bench, argv)


if __name__ == "__main__":
    sys.exit(bench_main())
