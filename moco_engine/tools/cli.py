"""Console entry points: parse arguments, load the config, call the library.

Expected errors (:class:`~moco_engine.config.schema.UserError`: bad config, missing data, incompatible
checkpoint) become one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from moco_engine.config.loading import load_config, split_args
from moco_engine.config.schema import UserError

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3  # the loss became NaN or infinite


def run_guarded(main: Callable[[list[str]], int], argv: Sequence[str] | None) -> int:
    """Run a command's ``main(args)``; a :class:`UserError` or an ``OSError`` (the disk, the
    file system) becomes one line on stderr (rank 0 only under torchrun) and exit code 2, a
    Ctrl-C exit code 130. Every console entry point goes through it."""
    # A warning is one line too ("warning: ..."), not Python's file:line and source excerpt.
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        return main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # Ctrl-C where no handler saves anything (moco-eval, moco-bench)
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except UserError as e:
        message = str(e)
    except OSError as e:  # the environment's fault (disk full, a read-only folder): name the file
        message = f"{e.filename or 'I/O'}: {e.strerror or e}" if e.filename or e.strerror else str(e)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
        print(f"error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def with_version(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--version`` (the package's version) to a command's parser."""
    from moco_engine import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def config_groups_help() -> str:
    """The epilog of commands that take settings: the groups, and where every key is listed."""
    from moco_engine.config.schema import Config

    groups = ", ".join(f.name for f in dataclasses.fields(Config))
    return (f"settings are key=value over the groups {groups}; configs/base.yaml lists every key with its "
            "default and a comment, and docs/settings.md the important ones")


def _train(args: list[str]) -> int:
    launched = time.perf_counter()  # the first step's line counts from here
    parser = argparse.ArgumentParser(
        prog="moco-train",
        description="MoCo pretraining. With no arguments: a short run on the CIFAR-10 sample shipped "
        "inside the package. Example: moco-train configs/experiment/cifar10_demo.yaml queue.size=8192",
        epilog=config_groups_help(),
    )
    with_version(parser)
    parser.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                        help="YAML config files (merged in order), then key=value overrides")
    files, overrides, others = split_args(parser.parse_args(args).items)
    cfg = load_config(files, overrides + others)  # another word is refused there, named

    from moco_engine.run.folder import agent_folder
    from moco_engine.run.signals import StopNow, StopRequested, StopSignals
    from moco_engine.run.trainer import Trainer
    from moco_engine.run.watch import NonFiniteLoss
    from moco_engine.runtime import distributed as dist  # torch loads only once the config is valid
    from moco_engine.runtime.precision import resolve_device

    agent = agent_folder(cfg.train)
    if dist.restarted() and not cfg.train.resume:
        cfg.train.resume = "auto"  # torchrun --max-restarts restarted us: go on from the checkpoint
    dist.setup(resolve_device(cfg.train.device).type)
    main_process = dist.is_main()  # asked now: after teardown every process looks like rank 0
    if agent and main_process:
        print(agent, flush=True)
    signals = StopSignals()  # from start-up (decoding the data set can take minutes) to the end
    try:
        with signals.catching():
            try:
                with signals.interruptible():
                    trainer = Trainer(cfg, signals=signals, launched=launched)
            except StopNow:
                raise StopRequested(signals.signum, 0, None) from None
            final = trainer.fit()
    except StopRequested as stop:
        if main_process:
            print(stop, file=sys.stderr)
        return 128 + stop.signum  # the shell's convention for "ended by signal N"
    except NonFiniteLoss as e:
        if main_process:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        dist.teardown()
    if main_process:  # every finished run says what comes next, with a monitor or without
        closing = {"retrieval": text_closing_lines, "pairs": pairs_closing_lines}.get(trainer.loaders.monitor)
        lines = (closing(final, trainer.run_dir, cfg.eval.retrieval_split) if closing
                 else closing_lines(final, trainer.run_dir))
        print("\n".join(lines), flush=True)
    return 0


def closing_lines(final: dict, run_dir: Path) -> list[str]:
    """What a finished ``moco-train`` prints: the kNN figure against the random network's (when
    ``eval.at_start`` measured it; or why there is none), where the curve is, and the commands
    that come next."""
    from moco_engine.run.folder import KNN_PLOT_FILE
    from moco_engine.run.tracking import METRICS_FILE, knn_curve
    from moco_engine.tools.proof import DEMO_COMMAND

    if "knn_top1" not in final:  # no labelled test split: no monitor
        lines = [f"trained {epochs_text(final['epochs'])} ({run_dir}); no kNN figure: the data have no labelled test split"]
    else:
        start = [top1 for epoch, top1 in knn_curve(run_dir / METRICS_FILE) if epoch == 0]
        versus = (f"; {start[-1]:.2f}% at random initialisation ({final['knn_top1'] - start[-1]:+.2f} points)"
                  if start else "")
        lines = [f"kNN top-1: {final['knn_top1']:.2f}% after {final['epochs']} epochs ({run_dir}){versus}"]
    if (run_dir / KNN_PLOT_FILE).exists():
        lines.append(f"kNN curve: {run_dir / KNN_PLOT_FILE}")
    return lines + [
        "Next:",
        f"  moco-eval linear {run_dir} linear.cached=true       # MoCo's linear probe on the frozen backbone",
        f"  moco-export {run_dir} --format both                 # weights for torchvision and detectron2",
        f"  {DEMO_COMMAND}   # the CIFAR-10 demo on a GPU (README.md)",
    ]


def at_start(run_dir: Path, key: str) -> float | None:
    """The monitor's ``key`` at random initialisation (``eval.at_start``), or None."""
    from moco_engine.run.tracking import METRICS_FILE, knn_curve

    start = [v for epoch, v in knn_curve(run_dir / METRICS_FILE, key) if epoch == 0]
    return start[-1] if start else None


def epochs_text(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def pairs_closing_lines(final: dict, run_dir: Path, split: str) -> list[str]:
    """What a finished image–text run prints: the monitor's rsum against the random towers' (or
    why there is none), and the commands that report the held-out figures."""
    if "rsum" not in final:  # no such split for the monitor
        first = f"trained {epochs_text(final['epochs'])} ({run_dir}); no recall monitor: the data have no split '{split}'"
    else:
        start = at_start(run_dir, "rsum")
        versus = f"; {start:.1f} at random initialisation" if start is not None else ""
        first = (f"rsum on the {split} pairs (the monitor): {final['rsum']:.1f} (R@10 image->text {final['i2t_R@10']:.1f}%, "
                 f"text->image {final['t2i_R@10']:.1f}%) after {final['epochs']} epochs ({run_dir}){versus}")
    return [first,
            "Next:",
            f"  moco-eval pairs {run_dir}                 # R@K both ways on the test split, chance and untrained beside it",
            f"  moco-eval zeroshot {run_dir} data.root=../shared/data/cifar10-test.tar.xz   # zero-shot CIFAR-10"]


def text_closing_lines(final: dict, run_dir: Path, split: str) -> list[str]:
    """What a finished text run prints: the monitor's nDCG@10 against the random network's (or
    why there is none), and the commands that report the held-out figure."""
    if "ndcg@10" not in final:  # no qrels for the monitor
        first = (f"trained {epochs_text(final['epochs'])} ({run_dir}); no retrieval monitor: the corpus has no "
                 f"qrels/{split}.tsv")
    else:
        start = at_start(run_dir, "ndcg@10")
        versus = f"; {start:.4f} at random initialisation" if start is not None else ""
        first = (f"nDCG@10 on the {split} qrels (the monitor): {final['ndcg@10']:.4f} after {final['epochs']} epochs "
                 f"({run_dir}){versus}")
    return [first,
            "Next:",
            f"  moco-eval retrieval {run_dir} eval.split=test       # the held-out figure, BM25 and the untrained encoder beside it",
            f"  moco-export {run_dir} --format sentence-transformers"]


def train_main(argv: Sequence[str] | None = None) -> int:
    """``moco-train [CONFIG.yaml ...] [key=value ...]``"""
    return run_guarded(_train, argv)


def _eval(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="moco-eval",
        description="Evaluate a checkpoint: its backbone's weighted kNN or MoCo's linear probe, a text run's retrieval "
        "or STS, an image-text run's retrieval both ways or zero-shot classification. The results go to "
        "<checkpoint>.<mode>.json beside the checkpoint (-1, -2, ... when that exists). Example: moco-eval linear runs/cifar10_demo linear.cached=true",
        epilog=config_groups_help(),
    )
    with_version(parser)
    parser.add_argument("mode", choices=["knn", "linear", "retrieval", "sts", "pairs", "zeroshot"],
                        help="knn, linear: images; retrieval (a BEIR folder or archive as data.root, eval.split=test), "
                        "sts (STS-B's folder or archive as data.root): text runs; pairs (the run's eval.split pairs "
                        "ranked both ways), zeroshot (an image folder or archive as data.root, "
                        "<root>/<data.test_split>/<class>/...): image-text runs (method=itc)")
    parser.add_argument("checkpoint", help="a checkpoint file, or a run folder (its latest checkpoint)")
    parser.add_argument("overrides", nargs="*", metavar="FILE.yaml|key=value",
                        help="changes to the checkpoint's saved config: YAML files in order (a probe protocol, "
                        "e.g. configs/linear/moco_v3_vit.yaml), then key=value (data.root, eval.knn_k, linear.epochs, ...)")
    parser.add_argument("--templates", metavar="FILE", default="",
                        help="zeroshot: prompt templates, one a line with {} where the class name goes ('#' "
                        "lines skipped; default: CLIP's 18 CIFAR templates)")
    ns = parser.parse_args(args)
    from moco_engine.evaluation.image_text import read_templates
    from moco_engine.evaluation.pairs_eval import evaluate_image_text, image_text_lines
    from moco_engine.evaluation.pretrained import evaluate_knn, evaluate_linear
    from moco_engine.run.pretrained import open_checkpoint_state

    if ns.templates and ns.mode != "zeroshot":
        raise UserError(f"--templates is for moco-eval zeroshot, not {ns.mode}")
    templates = read_templates(ns.templates) if ns.templates else None  # a bad file fails before the checkpoint is read
    files = [a for a in ns.overrides if a.endswith((".yaml", ".yml")) and "=" not in a]
    cfg, encoder, path, state = open_checkpoint_state(ns.checkpoint, [a for a in ns.overrides if a not in files], files)
    if ns.mode in ("pairs", "zeroshot"):
        result = evaluate_image_text(ns.mode, cfg, encoder, state, path, templates)
    elif ns.mode in ("retrieval", "sts"):
        result = evaluate_text(ns.mode, cfg, encoder, path, state)
    else:
        result = (evaluate_knn if ns.mode == "knn" else evaluate_linear)(cfg, encoder)
    result = {"checkpoint": str(path), "mode": ns.mode, **result}
    out = path.with_name(f"{path.stem}.{ns.mode}.json")
    n = 1
    while out.exists():  # an earlier evaluation's results stay; this one gets the next free name
        out, n = path.with_name(f"{path.stem}.{ns.mode}-{n}.json"), n + 1
    out.write_text(json.dumps(result, indent=1) + "\n")
    if ns.mode in ("retrieval", "sts", "pairs", "zeroshot"):
        lines = text_lines(result) if ns.mode in ("retrieval", "sts") else image_text_lines(result)
        print("\n".join(lines) + f"\n({out})")
        return 0
    print(f"{ns.mode}: top-1 {result.get('top1', result.get('knn_top1')):.2f}%, top-5 "
          f"{result.get('top5', result.get('knn_top5')):.2f}% ({out})")
    return 0


def evaluate_text(mode: str, cfg, encoder, path: Path, state: dict) -> dict:
    """``moco-eval retrieval|sts`` of a text run's checkpoint (its tokenizer and input shape from it)."""
    from moco_engine.config.registry import registry
    from moco_engine.evaluation.text_eval import evaluate_retrieval, evaluate_sts

    if not state.get("tokenizer") or registry("method")[cfg.method].pairs:  # a run on pairs keeps one too
        raise UserError(f"moco-eval {mode} judges a text run's encoder, and {path} is not one (model.arch={cfg.model.arch})")
    return (evaluate_retrieval if mode == "retrieval" else evaluate_sts)(cfg, encoder, state["tokenizer"], state["input_shape"])


def text_lines(result: dict) -> list[str]:
    """The report of ``moco-eval retrieval|sts``: one line a system."""
    if result["mode"] == "sts":
        head = f"STS-B {result['split']} ({result['pairs']} pairs), Spearman x100 of cosine similarity:"
        return [head] + [f"  {name:<10} {result[name]['spearman']:.2f}" for name in ("run", "untrained")]
    head = f"{result['data']} {result['split']} ({result['queries']} queries): nDCG@10  recall@100  MRR@10"
    return [head] + [f"  {name:<10} {r['ndcg@10']:.4f}   {r['recall@100']:.4f}      {r['mrr@10']:.4f}"
                     for name, r in ((n, result[n]) for n in ("run", "bm25", "untrained"))]


def eval_main(argv: Sequence[str] | None = None) -> int:
    """``moco-eval knn|linear|retrieval|sts|pairs|zeroshot CHECKPOINT [FILE.yaml ...] [key=value ...] [--templates FILE]``"""
    return run_guarded(_eval, argv)


def _export(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="moco-export",
        description="Export a checkpoint's query backbone: a torchvision state_dict (.pth), a detectron2 "
        "pretrained model (.pkl), a timm state_dict (_timm.pth), or moco-v3's own checkpoint (_moco_v3.pth.tar, "
        "for its main_lincls.py). both = torchvision and detectron2.",
    )
    with_version(parser)
    parser.add_argument("checkpoint", help="a checkpoint file, or a run folder (its latest checkpoint)")
    parser.add_argument("--format", choices=["torchvision", "detectron2", "timm", "moco_v3", "sentence-transformers", "both"],
                        default="both", help="sentence-transformers: a text run's encoder as a folder (_st)")
    parser.add_argument("--out", default="", help="output path without suffix (default: beside the checkpoint)")
    ns = parser.parse_args(args)
    from moco_engine.evaluation.export import export
    from moco_engine.run.checkpoint import load_checkpoint
    from moco_engine.run.pretrained import open_checkpoint

    cfg, encoder, path = open_checkpoint(ns.checkpoint)
    if ns.format == "sentence-transformers":
        from moco_engine.evaluation.export_text import export_sentence_transformers

        state = load_checkpoint(path)
        out = Path(ns.out).expanduser() if ns.out else path.with_name(path.stem + "_st")
        print(export_sentence_transformers(cfg, encoder, state.get("tokenizer") or "", out))
        return 0
    formats = ["torchvision", "detectron2"] if ns.format == "both" else [ns.format]
    stem = Path(ns.out).expanduser() if ns.out else path.with_suffix("")
    state = load_checkpoint(path) if ns.format == "moco_v3" else None  # f_k and the predictor too
    for written in export(encoder, stem, formats, state):
        print(written)
    return 0


def export_main(argv: Sequence[str] | None = None) -> int:
    """``moco-export CHECKPOINT [--format torchvision|detectron2|timm|moco_v3|sentence-transformers|both] [--out PATH]``"""
    return run_guarded(_export, argv)


if __name__ == "__main__":
    sys.exit(train_main())
