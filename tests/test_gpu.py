"""The CUDA path (skipped without a GPU): device augmentations, the bf16 step with split-BN in
channels_last, and the device data pipeline end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from moco_engine.config.loading import load_config
from moco_engine.data.images.augment import random_views
from moco_engine.data.images.recipes import view_spec
from moco_engine.method.norms import SplitBatchNorm
from moco_engine.run.trainer import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_device_views_on_cuda_are_seeded_and_in_range():
    spec = view_spec("moco_v2", 32)
    x = torch.randint(0, 256, (256, 3, 40, 40), dtype=torch.uint8, device="cuda")
    a = random_views(x, spec, torch.Generator(device="cuda").manual_seed(1))
    b = random_views(x, spec, torch.Generator(device="cuda").manual_seed(1))
    assert a.is_cuda and a.shape == (256, 3, 32, 32) and torch.equal(a, b)
    pixels = a * torch.tensor(spec.std, device="cuda").view(1, 3, 1, 1) + torch.tensor(spec.mean, device="cuda").view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


@pytest.mark.parametrize("impl", ["per_slice", "one_pass", "strided", "grouped"])
def test_split_bn_bf16_channels_last_matches_fp32(impl):
    torch.manual_seed(0)
    bn = SplitBatchNorm(16, 4, form=impl).to("cuda")
    x = torch.randn(64, 16, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    ref = bn(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = bn(x.bfloat16())
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out.float() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.parametrize("pipeline", ["cpu", "device"])
def test_a_short_cuda_run_in_bf16(tmp_path, pipeline):
    cfg = load_config([], [*TINY, f"train.out_dir={tmp_path / 'run'}", "train.device=cuda", f"data.pipeline={pipeline}"])
    trainer = Trainer(cfg)
    assert trainer.amp_dtype == torch.bfloat16 and trainer.negatives.keys.is_cuda
    final = trainer.fit()
    assert final["steps"] == 6 and 0 <= final["knn_top1"] <= 100


@pytest.mark.parametrize("symmetric, bn", [(False, "shuffle"), (True, "plain")])
def test_cuda_graphs_train_like_the_eager_step(tmp_path, symmetric, bn):
    """train.cuda_graphs replays the encoders' passes: the same run, in fp32, starts from the
    same losses as the eager one and ends finite (the symmetric, unshuffled case replays f_k
    twice per step, whose first keys must survive the second replay)."""
    import json

    common = [*TINY, "train.device=cuda", "train.precision=fp32", f"loss.symmetric={symmetric}", f"model.bn={bn}",
              "model.bn_splits=2", "eval.knn_features=head", "train.log_every=1"]
    losses = {}
    for name, extra in (("eager", []), ("graphs", ["train.cuda_graphs=true"])):
        out = tmp_path / name
        final = Trainer(load_config([], [*common, f"train.out_dir={out}", *extra])).fit()
        assert final["steps"] == 6 and 0 <= final["knn_top1"] <= 100
        losses[name] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                        if json.loads(line)["kind"] == "step"]
    assert len(losses["graphs"]) == 6 and all(torch.isfinite(torch.tensor(losses["graphs"])))
    # Compiled kernels round differently; the first step (identical weights and inputs) agrees closely.
    assert losses["graphs"][0] == pytest.approx(losses["eager"][0], rel=1e-3)


def test_the_gpu_text_recipe_replays_cuda_graphs_at_one_width_and_reads_nothing(tmp_path):
    """configs/experiment/scifact_contriever_gpu.yaml's shape on the embedded sample: every view
    padded to one width, f_q and f_k replayed as CUDA graphs, no host read in a step."""
    pytest.importorskip("transformers")
    from pathlib import Path

    from moco_engine.tools.opcount import count_ops, step_counters

    root = Path(__file__).resolve().parents[1] / "configs" / "experiment"
    cfg = load_config([str(root / "scifact_contriever.yaml"), str(root / "scifact_contriever_gpu.yaml")], [
        "data.root=''", "data.text.vocab_size=400", "model.params.layers=1", "model.params.hidden=32",
        "model.params.heads=2", "model.params.intermediate=64", "model.dim=32", "optim.batch_size=32",
        "queue.size=256", "train.epochs=1", "train.steps_per_epoch=4", "eval.knn_every=0",
        f"train.out_dir={tmp_path / 'run'}", "train.device=cuda"])
    trainer = Trainer(cfg)
    final = trainer.fit()
    assert final["steps"] == 4 and trainer.parts.graphed
    (x_q, x_k), _, idx = next(iter(trainer.loaders.train))
    assert "lengths" not in x_q and x_q["input_ids"].shape == x_k["input_ids"].shape  # one width, no host lengths
    step = lambda: trainer.train_step(x_q, x_k, idx)  # noqa: E731
    step()
    assert count_ops(step, step_counters(trainer.optimizer)).host_reads == {}
