"""How ``moco-bench`` builds what it times: a case's Trainer on generated data (a pairs folder
for a method on pairs), its step's inputs, and the supervised step of each tower it is measured
against. ``bench.py`` times and counts them."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from moco_engine.config.loading import load_config
from moco_engine.config.registry import registry
from moco_engine.config.rules import method_ignores
from moco_engine.config.schema import ModelConfig
from moco_engine.method.backbones import build_backbone
from moco_engine.runtime.batches import View
from moco_engine.runtime.precision import autocast
from moco_engine.tools.bench_cases import Case


def two_towers(case: Case) -> bool:
    """Whether the case's method trains an image tower and a text tower on (images, captions)
    (``MethodEntry.pairs``)."""
    return registry("method")[case.method].pairs


def pairs_folder(folder: Path, items: int, words: int = 12) -> Path:
    """A Karpathy-split folder of ``items`` training images (one colour each, 64 px JPEGs) with five
    captions of ``words`` random six-letter words each: from about 2,000 words on, the WordPiece a
    pairs run trains on them fills ``data.text.vocab_size`` (4096), as Flickr8k's captions do."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(items):
        colour = tuple(torch.randint(0, 256, (3,), generator=g).tolist())
        Image.new("RGB", (64, 64), colour).save(folder / "images" / f"{i}.jpg")
        letters = torch.randint(0, 26, (5, words, 6), generator=g).tolist()
        captions = [" ".join("".join(chr(97 + c) for c in word) for word in caption) for caption in letters]
        entries.append({"filename": f"{i}.jpg", "split": "train", "sentences": [{"raw": c} for c in captions]})
    (folder / "dataset_bench.json").write_text(json.dumps({"images": entries, "dataset": "bench"}))
    return folder


def build_trainer(case: Case, args: argparse.Namespace):
    """A Trainer for ``case``: synthetic data (the step's inputs are random tensors) unless
    ``--data`` asks for the real input path; a pairs case's a generated pairs folder (or
    ``--data-root``'s pairs with ``--data``)."""
    from moco_engine.run.trainer import Trainer

    if case.tokens and not two_towers(case):  # the embedded SciFact sample: its tokenizer and chunks; the step's inputs are random
        return Trainer(load_config([], [
            "data.name=text", f"model.arch={case.arch}", f"model.head={case.head}", f"queue.size={case.queue}",
            "queue.mask_same_instance=false",  # as the official builders: like for like
            f"optim.batch_size={case.batch}", f"train.device={args.device}", f"train.precision={args.precision}",
            f"train.compile={args.compile}", f"train.cuda_graphs={args.cuda_graphs}", "train.out_dir=runs/bench",
            "track.progress=false", *case.settings]))
    data = ["data.name=synthetic", f"data.synthetic_size={case.batch}", "data.num_workers=0"]
    if two_towers(case):
        root = args.data_root if args.data and args.data_root else pairs_folder(Path("runs/bench/pairs"), case.batch)
        data = ["data.name=pairs", f"data.root={root}", "data.test_split=''",
                f"data.num_workers={args.workers if args.data else 0}", f"data.pipeline={args.pipeline}"]
    elif args.data:
        root = Path(args.data_root).expanduser()
        shards = (root / "manifest.json").is_file() or root.suffix == ".txt"  # moco-shard's folder, or a list of shards
        data = ([f"data.name={'shards' if shards else 'imagefolder'}", f"data.root={args.data_root}"] if args.data_root
                else ["data.name=embedded"])
        data += [f"data.num_workers={args.workers}", f"data.pipeline={args.pipeline}", f"data.decode={args.decode}"]
    common = [
        f"data.image_size={case.image_size}", f"data.augmentation={case.augmentation}",
        f"model.arch={case.arch}", f"model.patch_size={case.patch_size}", f"model.head={case.head}",
        *([f"model.cifar_stem={case.cifar_stem}"] if case.arch.startswith("resnet") else []),
        f"model.bn_splits={case.bn_splits}", f"model.bn_split_form={args.split_bn}",
        f"queue.size={case.queue}", "queue.mask_same_instance=false", f"optim.batch_size={case.batch}",
        f"train.device={args.device}", f"train.precision={args.precision}",
        f"train.channels_last={not args.no_channels_last}", f"train.compile={args.compile}",
        f"train.cuda_graphs={args.cuda_graphs}",
        "train.out_dir=runs/bench", "track.progress=false",
    ]
    # What the method ignores is left out (each would draw a warning line), the case's own settings kept.
    ignored = method_ignores(registry("method")[case.method])
    common = [s for s in common if not any(s.startswith((f"{key}=", f"{key}.")) for key in ignored)]
    return Trainer(load_config([], [*data, f"method={case.method}", *common, *case.settings]))


def step_inputs(trainer, case: Case) -> tuple[View, View]:
    """Two random views of the case's batch on the training device: images (B, 3, H, W) in the
    run's memory format, or token ids and an all-ones attention mask (B, W); for two towers, the
    images and their captions (what a pairs loader gives: no host lengths)."""
    device = trainer.device
    shape = trainer.loaders.input_shape

    def tokens(vocab: int, lengths: bool) -> dict:
        # A text view carries the loader's host lengths, as a view padded to its batch's longest does.
        return {"input_ids": torch.randint(5, vocab, (case.batch, case.tokens), device=device),
                "attention_mask": torch.ones(case.batch, case.tokens, dtype=torch.long, device=device),
                **({"lengths": [case.tokens] * case.batch} if lengths else {})}

    def images() -> Tensor:
        size = (case.batch, 3, case.image_size, case.image_size)
        return torch.randn(size, device=device).contiguous(memory_format=trainer.memory_format)

    if two_towers(case):
        return images(), tokens(shape["text"]["vocab_size"][0], lengths=False)
    if case.tokens:
        return tokens(shape["vocab_size"][0], lengths=True), tokens(shape["vocab_size"][0], lengths=True)
    return images(), images()


def supervised_step(trainer, case: Case, views: tuple[View, View], labels) -> Callable[[], None]:
    """The supervised baseline on the first view: the same backbone (plain BatchNorm; a ViT's
    patch projection frozen as the MoCo v3 step's is; a text case's BERT as configured) and a
    linear classifier. For two towers, their sum: the image tower's step on the images, then the
    text tower's (``text_model``) on the captions. Its ``optimizers``: one a tower."""
    cfg, shape = trainer.cfg, trainer.loaders.input_shape
    towers = ([(cfg.model, shape["image"], views[0]), (cfg.text_model, shape["text"], views[1])]
              if two_towers(case) else [(cfg.model, shape, views[0])])
    steps = [tower_step(trainer, model_cfg, tower_shape, x, labels) for model_cfg, tower_shape, x in towers]

    def step() -> None:
        for one in steps:
            one()

    step.optimizers = [one.optimizer for one in steps]  # their step counters' reads are the optimizers', not the step's
    return step


def tower_step(trainer, model_cfg: ModelConfig, input_shape, x: View, labels) -> Callable[[], None]:
    """One backbone's supervised step on ``x``: SGD for images, AdamW for token ids."""
    same = ModelConfig(arch=model_cfg.arch, cifar_stem=model_cfg.cifar_stem, patch_size=model_cfg.patch_size,
                       freeze_patch_embed=model_cfg.freeze_patch_embed, params=dict(model_cfg.params))
    backbone, width = build_backbone(same, input_shape)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(width, 1000)).to(trainer.device, memory_format=trainer.memory_format)
    graphed = trainer.cfg.train.cuda_graphs  # compared like with like: graphed when the MoCo step is
    if trainer.cfg.train.compile or graphed:
        model.compile(mode="reduce-overhead" if graphed else None)
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-4) if isinstance(x, dict) else
           torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4))

    def step() -> None:
        if graphed:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(trainer.device, trainer.amp_dtype):
            loss = F.cross_entropy(model(x).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step.optimizer = opt
    return step


def text_vocab(trainer) -> int:
    """V of the run's token inputs (its tokenizer's vocabulary)."""
    shape = trainer.loaders.input_shape
    return int(shape.get("text", shape)["vocab_size"][0])
