"""README's "Extending" block, run as written: from any folder, in one process and under torchrun
with 2 processes, with each kind of negatives, stopped by SIGTERM and resumed bit-identically."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY
from test_distributed import EXACT, assert_same_ranks, stopped_and_resumed, torchrun
from torch import nn

import moco_engine
from moco_engine import Backbone, ConfigError, Splits, TensorItems, Trainer, load_config


def block(page: Path, heading: str) -> str:
    """The Python block of the section ``heading`` of ``page``, verbatim."""
    text = page.read_text()
    section = text[text.index(heading):]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


#: README's block (its data source the whole DataSource protocol, a class) and the same example
#: with the source as one function returning Splits (docs/extending.md).
BLOCKS = {"readme": (ROOT / "README.md", "## Extending"),
          "function": (ROOT / "docs" / "extending.md", "## A data source as one function")}


def readme_block() -> str:
    return block(*BLOCKS["readme"])


@pytest.fixture(scope="module", params=sorted(BLOCKS))
def extension(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp(request.param) / "extend.py"
    path.write_text(block(*BLOCKS[request.param]))
    return path


def test_the_readme_block_trains_from_a_folder_without_the_checkout(extension):
    done = subprocess.run([sys.executable, str(extension)], cwd=extension.parent, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert final["epochs"] == 2 and final["steps"] == 16 and 0 <= final["knn_top1"] <= 100
    assert "[eval] epoch -1" in done.stdout  # the kNN monitor runs on the source's labelled test split
    assert "warning" not in done.stderr  # nothing the chosen parts ignore was set


# The extension's run under torchrun: TINY's settings with the extension's parts (TINY's image
# settings are then ignored, with a warning), 2 epochs of 3 steps, SIGTERM'd in step 4.
POINTS = ["data.name=points", "data.params.n=96", "model.arch=mlp", "loss.name=align_uniform"]


@pytest.mark.distributed
# All slow: the default run keeps test_distributed's two-rank stop and resume of the built-in parts.
@pytest.mark.parametrize("kind", [pytest.param("queue", marks=pytest.mark.slow), pytest.param("memory_bank", marks=pytest.mark.slow),
                                  pytest.param("in_batch", marks=pytest.mark.slow)])
def test_the_extension_under_torchrun_stopped_and_resumed_is_bit_identical(tmp_path, extension, kind):
    overrides = [*POINTS, f"negatives.kind={kind}"]
    straight, r = torchrun(tmp_path / "straight", *EXACT, *overrides, module=extension)
    assert "data.name=points ignores" in r.stderr  # TINY's image settings, named once
    assert straight[0]["world"] == 2 and straight[0]["step"] == 6 and 0 <= straight[0]["knn"]["knn_top1"] <= 100
    assert_same_ranks(straight, stopped_and_resumed(tmp_path / "stopped", *overrides, module=extension))


def test_a_class_sources_state_is_kept_in_checkpoints_and_a_misfit_refuses_the_resume(tmp_path):
    """README's Points keeps its centres in every checkpoint; a resume onto other points (another
    seed draws other centres) is refused in one line naming the checkpoint and the source's why."""
    (tmp_path / "extend.py").write_text(readme_block())
    script = f"""
import sys, torch
sys.path.insert(0, {str(tmp_path)!r})
import extend
from moco_engine import Trainer, load_config
from moco_engine.run.checkpoint import CheckpointError, latest_checkpoint
args = {[*TINY, *POINTS, f"train.out_dir={tmp_path / 'run'}", "train.epochs=1"]!r}
first = Trainer(load_config([], args)); first.fit()
state = latest_checkpoint(first.run_dir)[1]
assert torch.equal(state["points_centres"], first.loaders.source.centres)
try:
    Trainer(load_config([], [*args, "train.epochs=2", "train.resume=auto", "train.seed=1"])).prepare_run_dir()
except CheckpointError as e:
    print("refused:", e)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused: checkpoint" in done.stdout and "was trained on other points" in done.stdout


class PairedInputs(nn.Module):
    """A backbone over dict views: {"x": (B, d), "w": (B, d)} -> features (B, 16)."""

    def __init__(self, d: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16))

    def forward(self, x: dict) -> torch.Tensor:
        return self.net(x["x"] * x["w"])


def register_dict_parts() -> None:
    """A source of unlabelled items whose views are dicts of tensors, and a backbone for them."""
    def source(cfg, seed):
        g = torch.Generator().manual_seed(seed)
        items = {"x": torch.randn(96, 6, generator=g), "w": torch.rand(96, 6, generator=g) + 0.5}
        noisy = lambda item: {"x": item["x"] + 0.1 * torch.randn_like(item["x"]), "w": item["w"]}  # noqa: E731
        return Splits(TensorItems(items), None, view=noisy, plain=lambda item: item)

    def backbone(cfg, input_shape):
        assert input_shape == {"x": (6,), "w": (6,)}  # one view of one item, as the data give it
        return Backbone(PairedInputs(6), 16)

    moco_engine.register_data_source("test_dicts", source, replace=True)
    moco_engine.register_backbone("test_paired", backbone, replace=True)


def test_dict_views_without_labels_train_with_the_monitor_off_and_resume(tmp_path, capsys):
    register_dict_parts()
    args = [*TINY, "data.name=test_dicts", "data.augmentation=cifar_light", "model.arch=test_paired",
            "model.bn_splits=2", "eval.at_start=true", "track.preview=4", f"train.out_dir={tmp_path / 'run'}"]
    args.remove("data.augmentation=cifar")  # TINY's image settings left at their defaults: no warning
    final = Trainer(load_config([], [*args, "train.epochs=1"])).fit()
    out, err = capsys.readouterr()
    assert "kNN monitor off: data.name=test_dicts gives no labelled test split" in out
    assert final == {"epochs": 1, "steps": 3}  # no kNN figures
    steps = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "step"]
    assert steps and all("samples_per_s" in r and "img_per_s" not in r for r in steps)
    assert not (tmp_path / "run" / "augmentations.png").exists()  # the preview is for images
    resumed = Trainer(load_config([], [*args, "train.epochs=2", "train.resume=auto"]))
    resumed.fit()
    assert resumed.step == 6 and resumed.state_dict()["input_shape"] == {"x": (6,), "w": (6,)}


def test_a_name_nothing_is_registered_under_lists_those_that_are():
    with pytest.raises(ConfigError, match=r"'model\.arch' = 'mlp2'.*registered: resnet18, resnet34, resnet50"):
        load_config([], ["model.arch=mlp2"])
    with pytest.raises(ConfigError, match=r"'loss\.params\.lam'.*loss\.name=infonce takes no such parameter"):
        load_config([], ["loss.params.lam=2"])


def test_a_source_state_that_takes_a_name_of_the_runs_own_snapshot_is_refused(tmp_path):
    """A source's state sits beside the run's entries in every checkpoint: a key of the run's own
    ("config", "step", "negatives", ...) would overwrite it, so taking the snapshot refuses it."""
    from moco_engine.data.images.source import ImageSource
    from moco_engine.data.images.sources import synthetic

    class Clashing(ImageSource):
        def __init__(self, cfg, saved=None):
            super().__init__(cfg, synthetic(cfg.data, cfg.train.seed))

        def state(self):
            return {"step": torch.zeros(1), "own": torch.ones(1)}

    moco_engine.register_data_source("test_clashing", Clashing, replace=True)
    trainer = Trainer(load_config([], [*TINY, "data.name=test_clashing", f"train.out_dir={tmp_path / 'run'}"]))
    with pytest.raises(ConfigError, match=r"the source's state names step, entries of the run's own snapshot"):
        trainer.state_dict()
