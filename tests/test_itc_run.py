"""method=itc as a run (issue 42's image–text stage): stopped mid-epoch and resumed bit-identical,
in one process and under torchrun; bad input one line; the figures W&B gets; the settings the
methods ignore; LiT (a locked image backbone, started from a MoCo run of this engine)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY
from test_pairs import PAIRS_TINY, karpathy

from moco_engine.config.loading import load_config
from moco_engine.config.rules import ignored_warning
from moco_engine.config.schema import UserError
from moco_engine.run.checkpoint import latest_checkpoint
from moco_engine.run.signals import StopRequested
from moco_engine.run.trainer import Trainer

# PAIRS_TINY as two small towers: 16 px images, a 1-layer 32-wide BERT, batch 4 (3 steps an epoch of
# the 20 training images), AdamW, so the learned T moves a little each step and stays inside its clamp.
ITC = [*PAIRS_TINY, "method=itc", "data.text.vocab_size=64", "data.image_size=16", "optim.batch_size=4",
       "optim.name=adamw", "optim.lr=0.001", "text_model.params.layers=1", "text_model.params.hidden=32",
       "text_model.params.heads=2", "text_model.params.intermediate=64", "loss.learn_temperature=true",
       "loss.temperature=0.1", "eval.knn_every=0", "eval.retrieval_split=val", "train.save_every=2"]
# ALBEF's negatives with K = 10, no multiple of the batch (the queue wraps mid-batch), and momentum
# distillation, which ramps in over epoch 0's 3 steps.
QUEUE = ["negatives.kind=queue", "queue.size=10", "loss.distill_alpha=0.4"]
KINDS = {"queue": QUEUE, "in_batch": ["negatives.kind=in_batch"]}
#: Everything a checkpoint holds that a resumed run must reproduce exactly.
SECTIONS = ("encoder_q", "encoder_k", "negatives", "optimizer", "scaler", "ranks", "tokenizer")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return karpathy(tmp_path_factory.mktemp("pairs"))


def itc_cfg(out, root, *extra):
    return load_config([], [*ITC, f"data.root={root}", f"train.out_dir={out}", *extra])


def leaves(state):
    return torch.utils._pytree.tree_leaves(state)


def assert_same_state(a: dict, b: dict) -> None:
    for section in SECTIONS:
        x, y = leaves(a[section]), leaves(b[section])
        assert len(x) == len(y), section
        for u, v in zip(x, y):
            assert (torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v), section


def recording(trainer: Trainer, draws: list) -> Trainer:
    """Record each step's items and the captions drawn for them (the token ids the text tower saw)."""
    step = trainer.train_step

    def recorded(images, captions, indices):
        draws.append((indices.tolist(), captions["input_ids"].tolist()))
        return step(images, captions, indices)

    trainer.train_step = recorded
    return trainer


# ---------------------------------------------------------------------------------------------- exact
def test_the_image_tower_has_plain_batchnorm_as_the_ignored_bn_splits_says(tmp_path, root):
    cfg = itc_cfg(tmp_path, root, "model.bn_splits=2")
    assert ignored_warning(cfg) == "warning: method=itc ignores model.bn_splits=2"
    norms = {type(m).__name__ for m in Trainer(cfg).encoder_q.image.modules() if "Norm" in type(m).__name__}
    assert norms == {"BatchNorm2d"}  # not SplitBatchNorm: the setting is ignored, as the warning says


# in_batch's state is the queue run's less the queues (their ground): slow, to keep the default run short.
@pytest.mark.parametrize("kind", ["queue", pytest.param("in_batch", marks=pytest.mark.slow)])
def test_an_itc_run_stopped_mid_epoch_resumes_bit_identical(tmp_path, root, kind):
    """SIGTERM in step 2 of 3 (epoch 0: the distillation's ramp half-way), resumed: the same end
    as the run left alone, to the bit: both towers and their EMA copies, T, the three queues and
    their step count, AdamW's moments, every random stream, and the captions each step drew."""
    straight_draws, stopped_draws = [], []
    straight = recording(Trainer(itc_cfg(tmp_path / "a", root, *KINDS[kind])), straight_draws)
    final = straight.fit()
    assert final["steps"] == 6 and "rsum" in final

    stopped = recording(Trainer(itc_cfg(tmp_path / "b", root, *KINDS[kind])), stopped_draws)
    step = stopped.train_step

    def signalled_in_step_2(images, captions, indices):
        if stopped.step + 1 == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run's handler: the step finishes, the run saves
        return step(images, captions, indices)

    stopped.train_step = signalled_in_step_2
    with pytest.raises(StopRequested, match="stopped by SIGTERM after step 2"):
        stopped.fit()
    saved = latest_checkpoint(tmp_path / "b")[1]
    assert (saved["step"], saved["epoch"], saved["step_in_epoch"]) == (2, 0, 2)  # mid-epoch
    if kind == "queue":
        assert saved["negatives"]["steps"] == 2  # the ramp: alpha 0.4 * 2/3 at the next step

    resumed = recording(Trainer(itc_cfg(tmp_path / "b", root, *KINDS[kind], "train.resume=auto")), stopped_draws)
    assert resumed.fit() == final  # the monitor's recalls too
    assert stopped_draws == straight_draws  # every step's items and the captions drawn for them
    a, b = straight.state_dict(), resumed.state_dict()
    assert_same_state(a, b)
    assert a["encoder_q"]["temp"] != 0.1 and 0.001 < a["encoder_q"]["temp"] < 0.5  # T learned, inside its clamp
    assert torch.equal(a["encoder_q"]["temp"], b["encoder_q"]["temp"])
    if kind == "queue":  # the two queues and their image ids, after 24 entries through K = 10
        for name in ("image.keys", "text.keys", "image.index", "text.index", "steps"):
            assert torch.equal(a["negatives"][name], b["negatives"][name]), name
        assert a["negatives"]["steps"] == 6 and bool((a["negatives"]["image.index"] >= 0).all())
        assert a["encoder_k"] is not None and torch.equal(a["encoder_k"]["encoder.temp"], b["encoder_k"]["encoder.temp"])
    else:  # CLIP's: no momentum towers, no stored negatives
        assert a["encoder_k"] is None and b["encoder_k"] is None
    # The draw moves with the epoch: some item shows another caption in epoch 1 than in epoch 0.
    epoch0 = {i: ids for s in straight_draws[:3] for i, ids in zip(*s)}
    assert any(epoch0.get(i, ids) != ids for s in straight_draws[3:] for i, ids in zip(*s))


@pytest.mark.slow  # three launches of 2 processes
@pytest.mark.distributed
def test_an_itc_run_on_two_processes_stopped_mid_epoch_resumes_bit_identical(tmp_path):
    """The same under torchrun: SIGTERM'd on rank 1 in step 4 (epoch 1 of 3-step epochs) and
    resumed, every rank ends bit-identical to the run left alone (its towers and their EMA copies,
    T, the queues, AdamW's moments, its random streams, the tokenizer kept), and both ranks hold
    the same queues, filled from the gathered batch (2 x 16 an entry step into K = 50)."""
    from test_distributed import assert_same_ranks, stopped_and_resumed, torchrun

    root = karpathy(tmp_path / "data", splits=(("train", 96), ("val", 4)))  # 3 steps of 2 x 16 an epoch
    itc = [*(o for o in ITC[len(PAIRS_TINY):] if not o.startswith("optim.batch_size")), *QUEUE, "queue.size=50",
           "data.name=pairs", f"data.root={root}", "data.augmentation=cifar", "data.test_split=''"]
    straight, _ = torchrun(tmp_path / "straight", *itc)
    assert straight[0]["world"] == 2 and straight[0]["step"] == 6 and "rsum" in straight[0]["final"]
    resumed = stopped_and_resumed(tmp_path / "stopped", *itc)
    assert_same_ranks(straight, resumed)
    assert resumed[0]["final"] == straight[0]["final"]
    assert resumed[0]["tokenizer"] == resumed[1]["tokenizer"] == straight[0]["tokenizer"]
    for ranks in (straight, resumed):  # one set of queues: rank 0's is rank 1's
        for name, t in ranks[0]["negatives"].items():
            assert torch.equal(t, ranks[1]["negatives"][name]), name
    assert straight[0]["negatives"]["steps"] == 6 and bool((straight[0]["negatives"]["image.index"] >= 0).all())
    assert straight[0]["seen"] != straight[1]["seen"]  # each rank its own images


# ---------------------------------------------------------------------------------------------- bad input
def folder_state(run):
    """Every file under ``run`` and its bytes (what a refused start must leave as it was)."""
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_itc_on_a_source_without_captions_is_one_line_and_touches_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError) as refused:
        Trainer(load_config([], [*TINY, "method=itc", f"train.out_dir={out}"]))
    assert str(refused.value) == ("config key 'method' = 'itc': it trains on image-caption pairs, and "
                                  "data.name=synthetic has no captions (data.name=pairs has, and shards with .txt captions)")
    assert not out.exists()


@pytest.mark.slow  # a subprocess; the message is checked in process in the default run
def test_itc_without_captions_through_moco_train_exits_2_in_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    r = subprocess.run([sys.executable, "-m", "moco_engine", *TINY, "method=itc", f"train.out_dir={out}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == ["error: config key 'method' = 'itc': it trains on image-caption pairs, "
                                             "and data.name=synthetic has no captions (data.name=pairs has, and shards with .txt captions)"]
    assert folder_state(out) == {out.relative_to(out) / "notes.txt": b"kept"}


@contextlib.contextmanager
def shell_without_wandb(**variables):
    """conftest.py's hermetic environment, for a module's fixture (set up before that autouse one):
    no WANDB_* variable of the shell's, and ``variables`` set."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("WANDB_")]:
            mp.delenv(name)
        for name, value in variables.items():
            mp.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, root):
    """One epoch of ALBEF's ITC, logged to an offline W&B run (whatever WANDB_* the shell has)."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    with shell_without_wandb(WANDB_SILENT="true"):
        final = Trainer(itc_cfg(out, root, *QUEUE, "train.epochs=1", "train.log_every=1",
                                "track.wandb.mode=offline")).fit()
    return out, final


def test_a_resume_of_an_itc_run_with_another_tokenizer_is_one_line_and_loses_nothing(tracked_run, root):
    out, _ = tracked_run
    before = folder_state(out)
    with pytest.raises(UserError, match=r"^checkpoint .*checkpoint_00000003\.pt was trained with another tokenizer "
                                        r"than this run's \(data.text.vocab_size 64 \(checkpoint\) vs 80 \(config\)\)"
                       ) as refused:
        Trainer(itc_cfg(out, root, *QUEUE, "train.epochs=2", "train.resume=auto", "data.text.vocab_size=80"))
    assert "\n" not in str(refused.value)
    assert folder_state(out) == before  # the checkpoint, its tokenizer, metrics.jsonl, W&B's files: as they were


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["images"][1].update(filename="gone.jpg"), r"images\[1\]: image .*images/gone.jpg not found"),
    (lambda d: d["images"][2].update(sentences=[]), r"images\[2\]: image images/2.jpg has no caption"),
    (lambda d: d["images"][0]["sentences"][1].update(raw=" \t "), r"images\[0\]: image images/0.jpg's caption 1 is empty"),
    (lambda d: d.pop("images"), r"dataset_fake.json: no 'images' list"),
    (lambda d: [e.update(split="val") for e in d["images"]], r"dataset_fake.json: no image in split 'train' "
                                                             r"\(its splits: val \(3\)\)"),
])
def test_bad_pairs_stop_an_itc_run_in_one_line_before_anything_is_written(tmp_path, edit, message):
    """test_pairs.py reads each case directly; here a run of method=itc meets them, as a user's does."""
    from test_pairs import bad_json

    out = tmp_path / "run"
    with pytest.raises(UserError, match=message) as refused:
        Trainer(itc_cfg(out, bad_json(tmp_path, edit)))
    assert "\n" not in str(refused.value) and not out.exists()


# ---------------------------------------------------------------------------------------------- W&B
def test_the_temperature_both_losses_and_the_monitors_rsum_reach_wandb(tracked_run):
    import json

    from test_sweep import offline_history

    out, final = tracked_run
    rows = offline_history(out)
    logged = {key for row in rows for key in row}
    assert {"step/temperature", "step/loss_i2t", "step/loss_t2i", "step/distill_alpha", "eval/rsum",
            "eval/i2t_R@1", "eval/t2i_R@1", "final/rsum"} <= logged, sorted(logged)
    steps = [row for row in rows if "step/temperature" in row]
    jsonl = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert [r["step/temperature"] for r in steps] == [r["temperature"] for r in jsonl]  # the same figures
    assert [r["_step"] for r in steps] == [1, 2, 3] and steps[0]["step/temperature"] == pytest.approx(0.1)
    (rsum,) = [row["eval/rsum"] for row in rows if "eval/rsum" in row]
    assert rsum == final["rsum"] and 0 < rsum <= 600


# ---------------------------------------------------------------------------------------------- ignored settings
@pytest.mark.parametrize("overrides,line", [
    (["loss.distill_alpha=0.4"], "warning: method=moco ignores loss.distill_alpha=0.4"),
    (["text_model.params.layers=2"], "warning: method=moco ignores text_model.params.layers=2"),
    (["loss.learn_temperature=true", "model.locked=true"],
     "warning: method=moco ignores model.locked=True, loss.learn_temperature=True"),
    (["method=itc", "loss.name=nce"], "warning: method=itc ignores loss.name=nce"),
    # The text tower's D, unit outputs and EMA are model's, and only model.init_from is read.
    (["method=itc", "text_model.dim=64", "text_model.init_from=/w.pt"],
     "warning: method=itc ignores text_model.dim=64, text_model.init_from=/w.pt"),
    (["method=itc", "text_model.params.layers=2", "text_model.locked=true"], None),  # read: no warning
])
def test_the_settings_a_method_ignores_draw_one_line_naming_them(overrides, line):
    assert ignored_warning(load_config([], overrides)) == line


# ---------------------------------------------------------------------------------------------- LiT
@pytest.fixture(scope="module")
def moco_run(tmp_path_factory, root):
    """A method=moco run of this engine on the same pairs' training images (one epoch of 2 steps)."""
    out = tmp_path_factory.mktemp("moco") / "run"
    with shell_without_wandb():
        Trainer(load_config([], [*PAIRS_TINY, f"data.root={root}", "data.text.vocab_size=64", "data.image_size=16",
                                 "optim.batch_size=8", "train.epochs=1", f"train.out_dir={out}"])).fit()
    return out


def moco_backbone(run):
    return {k.removeprefix("backbone."): v for k, v in latest_checkpoint(run)[1]["encoder_q"].items()
            if k.startswith("backbone.")}


def test_lit_trains_the_projection_and_the_text_tower_on_a_locked_backbone_from_a_moco_run_folder(tmp_path, root,
                                                                                                  moco_run, capsys):
    """LiT (Zhai et al. 2022): model.init_from=<the MoCo run's folder> starts the image backbone from
    its newest checkpoint, and model.locked=true keeps every weight and BatchNorm statistic of it
    (f_q's and f_k's) through training, while the image projection, the text tower and T train."""
    trainer = Trainer(itc_cfg(tmp_path / "lit", root, *QUEUE, "train.epochs=1", "model.locked=true",
                              f"model.init_from={moco_run}"))
    towers = trainer.encoder_q
    before = {name: [t.clone() for t in part.state_dict().values()]
              for name, part in (("projection", towers.image.head), ("text tower", towers.text))}
    frozen = {id(p) for p in towers.backbone.parameters()}
    assert not frozen & {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}  # not the optimizer's
    assert trainer.fit()["steps"] == 3
    (checkpoint,) = (moco_run / "checkpoints").glob("checkpoint_*.pt")
    assert f"model.init_from: the backbone starts from 120 tensors of {checkpoint}\n" in capsys.readouterr().err
    moco = moco_backbone(moco_run)
    assert any("running_mean" in k for k in moco) and any("num_batches_tracked" in k for k in moco)
    for backbone in (towers.backbone, trainer.encoder_k.encoder.backbone):
        own = backbone.state_dict()
        assert own.keys() == moco.keys()
        for k, v in moco.items():  # weights, running statistics, their counts: the MoCo run's, to the bit
            assert torch.equal(own[k], v), k
    for name, part in (("projection", towers.image.head), ("text tower", towers.text)):
        assert not all(torch.equal(a, b) for a, b in zip(before[name], part.state_dict().values())), name
    assert towers.temp.item() != pytest.approx(0.1, abs=0)
    assert not towers.backbone.training and towers.image.head.training  # locked: in eval mode while training


def test_init_from_takes_a_run_folder_or_its_checkpoints_folder_and_refuses_an_empty_one(tmp_path, moco_run,
                                                                                         tracked_run):
    from moco_engine.method.backbones import build_backbone
    from moco_engine.method.init_from import init_backbone
    from moco_engine.run.opening import init_weights

    (checkpoint,) = (moco_run / "checkpoints").glob("checkpoint_*.pt")
    for named in (moco_run, moco_run / "checkpoints"):
        path, loaded = init_weights(str(named))
        assert path == str(checkpoint) and loaded["step"] == 2
    assert init_weights(str(checkpoint)) == (str(checkpoint), None)  # a file: read by init_backbone, as before
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"^config key 'model.init_from' = '.*empty': a folder without checkpoints"):
        init_weights(str(tmp_path / "empty"))
    # An itc run's image tower starts another run's backbone (image.backbone.* in its encoder_q).
    cfg = load_config([], [*TINY, "data.image_size=16"])
    backbone = build_backbone(cfg.model, (3, 16, 16))[0]
    init_backbone(backbone, *init_weights(str(tracked_run[0])))
    image = {k.removeprefix("image.backbone."): v for k, v in latest_checkpoint(tracked_run[0])[1]["encoder_q"].items()
             if k.startswith("image.backbone.")}
    assert image and all(torch.equal(backbone.state_dict()[k], v) for k, v in image.items())


def test_an_itc_run_without_its_monitors_split_says_which_monitor_is_off(tmp_path, root, capsys):
    from types import SimpleNamespace

    from moco_engine.run.opening import open_tracking

    cfg = itc_cfg(tmp_path, root, "eval.retrieval_split=dev", "eval.knn_every=1")
    tracker, _ = open_tracking(cfg, tmp_path, None, SimpleNamespace(monitor="pairs", images=True), 0, monitor=False)
    tracker.close()
    assert capsys.readouterr().out == ("image-text monitor off: data.name=pairs has no split 'dev' to rank "
                                       "(eval.retrieval_split)\n")  # not the kNN monitor's line
