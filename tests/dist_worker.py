"""Run under torchrun by tests/test_distributed.py: trains a tiny config and dumps what each rank
holds, so the test can compare ranks (and a one-process run).

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py OUT_DIR key=value ...

With ``--crash-at-step N`` rank 1 kills itself (SIGKILL) at step N in the first attempt (a crash
for ``--max-restarts``); with ``--stop-at-step N`` rank 1 takes a SIGTERM during step N (the
ranks agree to stop at the next log point, save and exit 143); with ``--import FILE`` the file
is run first as a module (README's extension registers its backbone, loss and data source). The
run goes through ``moco_engine.tools.cli.train_main`` as a user's would.
"""

from __future__ import annotations

import os
import random
import runpy
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moco_engine.evaluation.knn import extract_features, knn_accuracy  # noqa: E402
from moco_engine.run.trainer import Trainer  # noqa: E402
from moco_engine.runtime import distributed as dist  # noqa: E402
from moco_engine.tools.cli import train_main  # noqa: E402


def unsharded_knn(trainer: Trainer) -> dict[str, float]:
    """The kNN accuracy of ``Trainer.evaluate_knn``, every split encoded whole by this process alone."""
    cfg, loaders = trainer.cfg.eval, trainer.loaders
    model = trainer.encoder_q.backbone if cfg.knn_features == "backbone" else trainer.encoder_q
    memory = extract_features(model, loaders.plain_train, trainer.device)
    query = extract_features(model, loaders.test, trainer.device)
    return knn_accuracy(*query, *memory, loaders.num_classes, cfg.knn_k, cfg.knn_t)


def main() -> int:
    args = sys.argv[1:]
    if args and args[0] == "--import":
        runpy.run_path(args[1], run_name="extension")  # its registrations, not its __main__ block
        args = args[2:]
    crash_at = stop_at = None
    if args and args[0] == "--crash-at-step":
        crash_at, args = int(args[1]), args[2:]
    if args and args[0] == "--stop-at-step":
        stop_at, args = int(args[1]), args[2:]
    size_exchanges = []
    original_sizes = dist.gather_sizes

    def counting_sizes(n, device):  # a host sync every step would show up here
        size_exchanges.append(n)
        return original_sizes(n, device)

    dist.gather_sizes = counting_sizes
    out = Path(args[0])
    seen: list[list[int]] = []
    original_step = Trainer.train_step
    original_fit = Trainer.fit

    def recording_step(self, x_q, x_k, indices):
        if crash_at is not None and self.step + 1 == crash_at and dist.rank() == 1 and not dist.restarted():
            print(f"simulated crash of rank 1 at step {crash_at}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if stop_at is not None and self.step + 1 == stop_at and dist.rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run's handler: a clean stop
        seen.append(indices.tolist())
        return original_step(self, x_q, x_k, indices)

    def dumping_fit(self):
        result = original_fit(self)
        # What this rank holds at the end, before the extra encodings below touch f_k's statistics.
        held = {
            "encoder_k": None if self.encoder_k is None else {k: v.clone() for k, v in self.encoder_k.state_dict().items()},
            # SGD's momentum buffers, AdamW's moments and step counts: every tensor the optimizer holds.
            "momentum_buffers": [t.clone() for s in self.optimizer.state_dict()["state"].values()
                                 for _, t in sorted(s.items()) if torch.is_tensor(t)],
            "torch_rng": torch.get_rng_state(), "python_draw": random.random(),
            "size_exchanges": len(size_exchanges),
        }
        if self.loaders.test is None:  # no labelled split to kNN (text, pairs): the state alone
            torch.save({"negatives": {k: v.cpu() for k, v in self.negatives.state_dict().items()},
                        "encoder_q": {k: v.cpu() for k, v in self.encoder_q.state_dict().items()},
                        "seen": seen, "world": dist.world_size(), "step": self.step, "final": result,
                        **self.loaders.source_state(), **held}, out / f"rank{dist.rank()}.pt")
            return result
        encoder = self.encoder_q if self.encoder_k is None else self.encoder_k
        full = extract_features(encoder, self.loaders.plain_train, self.device, batch_stats=True)[0]
        torch.save({
            "negatives": {k: v.cpu() for k, v in self.negatives.state_dict().items()},
            "encoder_q": {k: v.cpu() for k, v in self.encoder_q.state_dict().items()},
            "seen": seen, "world": dist.world_size(), "step": self.step, "full_encoding": full.cpu(),
            "shard_batches": [len(idx) for _, _, idx in self.loaders.plain_train_shard],
            # kNN as each rank computed it (sharded encoding), and on one process's whole splits.
            "knn": self.evaluate_knn(), "knn_unsharded": unsharded_knn(self), **held,
        }, out / f"rank{dist.rank()}.pt")
        return result

    Trainer.train_step = recording_step
    Trainer.fit = dumping_fit
    return train_main([*args[1:], f"train.out_dir={out / 'run'}"])


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
