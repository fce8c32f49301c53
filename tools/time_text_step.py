"""Time a text recipe's training step on its own batches (real spans, real padding), which
``moco-bench`` does not: its text cases feed fixed-width random ids, so padding-dependent
settings such as ``model.params.length_buckets`` show only here.

    python tools/time_text_step.py                                   # the SciFact recipe as shipped
    python tools/time_text_step.py model.params.length_buckets=1     # any override of it

Prints the median milliseconds of the data and of the step over ``--steps`` steps after
``--warmup``; the run folder is a temporary one. Threads: ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from moco_engine.config.loading import load_config
from moco_engine.run.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    parser.add_argument("--config", default="configs/experiment/scifact_contriever.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(load_config([args.config], [f"train.out_dir={folder}", *args.overrides]))
        trainer.encoder_q.train()
        trainer.encoder_k.train()
        batches = iter(trainer.loaders.train)
        data, step = [], []
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            (x_q, x_k), _, indices = next(batches)
            ready = time.perf_counter()
            trainer.train_step(x_q, x_k, indices)
            done = time.perf_counter()
            if i >= args.warmup:
                data.append(ready - start)
                step.append(done - ready)
    print(f"data {1000 * statistics.median(data):.1f} ms, step {1000 * statistics.median(step):.1f} ms "
          f"(median of {args.steps} steps after {args.warmup})")


if __name__ == "__main__":
    main()
