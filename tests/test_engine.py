import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY
from torchvision import transforms as T

from moco_engine.config.loading import load_config
from moco_engine.config.schema import UserError
from moco_engine.method.schedules import lr_at
from moco_engine.run.checkpoint import checkpoint_files, latest_checkpoint
from moco_engine.run.trainer import Trainer


def tiny(tmp_path, *extra):
    return load_config([], [*TINY, f"train.out_dir={tmp_path / 'run'}", *extra])


def records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_lr_schedule_warmup_cosine_and_steps():
    cfg = load_config([], ["train.epochs=10", "optim.lr=1.0", "optim.warmup_epochs=1"])
    assert lr_at(cfg, 0, 10) == pytest.approx(0.1)  # warm-up: (step + 1) / warm-up steps
    assert lr_at(cfg, 9, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 10 + 45, 10) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_at(cfg, 100, 10) == pytest.approx(0.0)
    steps = load_config([], ["optim.schedule=step", "optim.lr=1.0", "optim.milestones=[2,4]", "optim.gamma=0.1"])
    assert [lr_at(steps, s * 5, 5) for s in (0, 2, 3, 4)] == pytest.approx([1.0, 0.1, 0.1, 0.01])


# One to three minutes each on 2 cores: all three slow (the default run's training tests are the
# exactness ones; test_extending trains end to end).
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["queue", "memory_bank", "in_batch"])
def test_a_short_run_of_each_kind_lowers_its_loss(tmp_path, kind):
    # MoCo's loss first climbs towards ln(K+1) as real keys replace the queue's random start, and
    # under the CIFAR crops a ResNet needs hundreds of steps to come down from there. With a mild
    # view (pixel noise) the synthetic items' own colour layouts are learnable at once, so 60
    # steps, with shuffle- and split-BN against the BatchNorm shortcut, show each kind learn. The
    # bank starts from an encoding pass and is refreshed after each of the 6 epochs (10 steps each).
    cfg = tiny(tmp_path, "data.synthetic_size=640", "optim.batch_size=64", "model.head=linear",
               "queue.size=256", "train.epochs=6", "train.steps_per_epoch=0", "train.log_every=1", "optim.lr=0.05",
               "model.bn=shuffle", "model.bn_splits=2", "model.dim=32", f"negatives.kind={kind}",
               "memory_bank.init=encode", "memory_bank.positive=key", "eval.knn_every=0")
    mild = T.Compose([T.ToTensor(), T.Lambda(lambda x: x - 0.5 + 0.05 * torch.randn_like(x))])
    trainer = Trainer(cfg, view=mild)
    trainer.fit()
    losses = [r["loss"] for r in records(tmp_path / "run", "step")]
    assert len(losses) == 60
    # "Early" starts once the negatives are real embeddings: the queue begins as random vectors
    # (full of keys after 4 steps); the bank is encoded before step 0; in-batch has no state.
    early = sum(losses[5:15]) / 10 if kind == "queue" else sum(losses[:5]) / 5
    late = sum(losses[-10:]) / 10
    assert late < 0.9 * early, [round(x, 3) for x in losses]


def test_bank_refresh_equals_a_fresh_encoding_of_every_item(tmp_path):
    trainer = Trainer(tiny(tmp_path, "negatives.kind=memory_bank", "memory_bank.update=refresh", "train.epochs=1"))
    trainer.prepare_run_dir()
    metrics = trainer.train_epoch()  # ends with the refresh
    assert metrics["refresh_s"] > 0 and 0 < metrics["refresh_pct"] < 100
    # Encode every item again, batch by batch as the refresh does (BN on batch statistics).
    dataset = trainer.loaders.plain_train.dataset
    encoder = trainer.encoder_k.train()
    batch = cfg_batch = trainer.cfg.eval.batch_size
    with torch.no_grad():
        for start in range(0, len(dataset), cfg_batch):
            images = torch.stack([dataset[i][0] for i in range(start, min(start + batch, len(dataset)))])
            expected = encoder(images.to(memory_format=torch.channels_last))
            assert torch.allclose(trainer.negatives.bank[start : start + len(images)], expected, atol=1e-5)


@pytest.mark.slow  # three subprocesses
def test_memory_bank_bad_input_names_both_numbers(tmp_path):
    base = [sys.executable, "-m", "moco_engine", *TINY, f"train.out_dir={tmp_path / 'run'}", "negatives.kind=memory_bank"]
    r = subprocess.run([*base, "memory_bank.replacement=false", "queue.size=500"], capture_output=True, text=True)
    assert r.returncode == 2 and "500" in r.stderr and "N=96" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert subprocess.run([*base, "train.epochs=1"], capture_output=True, text=True).returncode == 0
    r = subprocess.run([*base, "train.resume=auto", "data.synthetic_size=80"], capture_output=True, text=True)
    assert r.returncode == 2 and "N=96" in r.stderr and "N=80" in r.stderr, r.stderr


def test_step_order_updates_key_encoder_and_queue_after_the_optimizer(tmp_path):
    cfg = tiny(tmp_path, "model.momentum=0.5")
    trainer = Trainer(cfg)
    k_before = [p.clone() for p in trainer.encoder_k.encoder.parameters()]
    x = torch.randn(16, 3, 32, 32)
    trainer.train_step(x, x.flip(3), torch.arange(16))
    for q1, k0, k1 in zip(trainer.encoder_q.parameters(), k_before, trainer.encoder_k.encoder.parameters()):
        assert torch.allclose(k1, 0.5 * k0 + 0.5 * q1, atol=1e-6)  # EMA towards the *updated* f_q
    assert int(trainer.negatives.ptr) == 16


def test_symmetric_loss_enqueues_both_keys(tmp_path):
    trainer = Trainer(tiny(tmp_path, "loss.symmetric=true", "queue.size=50"))
    x = torch.randn(16, 3, 32, 32)
    metrics = trainer.train_step(x, x.flip(3), torch.arange(16))
    assert int(trainer.negatives.ptr) == 32 and torch.isfinite(metrics["loss"])


@pytest.mark.parametrize("extra", [
    ["model.bn=plain"], ["train.precision=bf16"], ["model.head=linear", "model.momentum_schedule=cosine"],
    ["negatives.kind=memory_bank", "loss.name=nce"], ["negatives.kind=in_batch", "loss.symmetric=true"],
    ["queue.mask_same_instance=true", "queue.dtype=float16", "model.head=mlp_bn"],
])
def test_options_run_a_step(tmp_path, extra):
    trainer = Trainer(tiny(tmp_path, *extra))
    x = torch.randn(16, 3, 32, 32)
    assert torch.isfinite(trainer.train_step(x, x, torch.arange(16))["loss"])


def test_cli_runs_end_to_end(tmp_path):
    out = tmp_path / "smoke"
    r = subprocess.run([sys.executable, "-m", "moco_engine", str(ROOT / "configs" / "smoke.yaml"), f"train.out_dir={out}",
                        "eval.at_start=true"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # The closing lines: the figure against the random network's, the curve, the next commands.
    (summary,) = [line for line in r.stdout.splitlines() if line.startswith("kNN top-1:")]
    final_top1, start_top1 = (records(out, kind)[0]["knn_top1"] for kind in ("final", "eval"))
    assert summary.endswith(f"; {start_top1:.2f}% at random initialisation ({final_top1 - start_top1:+.2f} points)")
    assert f"kNN curve: {out / 'knn.png'}" in r.stdout and (out / "knn.png").stat().st_size > 1000
    assert r.stdout.strip().splitlines()[-3:][0].startswith(f"  moco-eval linear {out}")
    assert (out / "config.yaml").is_file() and len(checkpoint_files(out)) == 2
    assert load_config([str(out / "config.yaml")]).train.out_dir == str(out)
    steps = records(out, "step")
    assert {"loss", "top1", "top5", "lr", "momentum", "img_per_s"} <= set(steps[0])
    assert "knn_top1" in records(out, "final")[0]
    assert [r["epoch"] for r in records(out, "eval")] == [-1, 0, 1]  # the baseline, then each epoch
    state = latest_checkpoint(out)[1]
    assert state["config"]["queue"]["size"] == 100 and state["epoch"] == 2


def test_resume_continues_the_epoch_count_and_restores_the_queue(tmp_path):
    Trainer(tiny(tmp_path, "train.epochs=1")).fit()
    _, state = latest_checkpoint(tmp_path / "run")
    resumed = Trainer(tiny(tmp_path, "train.epochs=2", "train.resume=auto"))
    resumed.prepare_run_dir()
    assert resumed.epoch == 1 and resumed.step == 3
    assert torch.equal(resumed.negatives.keys, state["negatives"]["keys"])
    assert torch.equal(resumed.negatives.ptr, state["negatives"]["ptr"])
    resumed.fit()
    assert [r["epoch"] for r in records(tmp_path / "run", "epoch")] == [0, 1]


def test_resumed_run_ends_bit_identical_to_a_straight_run(tmp_path):
    straight = Trainer(tiny(tmp_path / "a"))
    straight.fit()
    stopped = Trainer(tiny(tmp_path / "b"))  # the same run, stopped after its first epoch
    stopped.prepare_run_dir()
    stopped.train_epoch()
    stopped.save()
    del stopped
    resumed = Trainer(tiny(tmp_path / "b", "train.resume=auto"))
    resumed.fit()
    for a, b in zip(straight.encoder_q.state_dict().values(), resumed.encoder_q.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.optimizer.state_dict()["state"].values(), resumed.optimizer.state_dict()["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    for a, b in zip(straight.encoder_k.state_dict().values(), resumed.encoder_k.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(straight.negatives.keys, resumed.negatives.keys)


@pytest.mark.fault("resume")
def test_a_run_folder_with_checkpoints_is_not_clobbered(tmp_path):
    Trainer(tiny(tmp_path, "train.epochs=1")).fit()
    saved = checkpoint_files(tmp_path / "run")
    with pytest.raises(UserError, match="already holds a run"):
        Trainer(tiny(tmp_path, "train.epochs=1")).fit()
    assert checkpoint_files(tmp_path / "run") == saved
    Trainer(tiny(tmp_path, "train.epochs=1", "train.overwrite=true")).fit()


@pytest.mark.slow  # subprocesses; -m fault runs it
@pytest.mark.fault("resume")
def test_incompatible_checkpoint_is_refused_in_one_line(tmp_path):
    Trainer(tiny(tmp_path, "train.epochs=1")).fit()
    r = subprocess.run([sys.executable, "-m", "moco_engine", *TINY, f"train.out_dir={tmp_path / 'run'}",
                        "train.resume=auto", "queue.size=64"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "queue.size 50 (checkpoint) vs 64 (config)" in r.stderr
    # Any setting that changes a tensor's name or shape, not only a listed few.
    r = subprocess.run([sys.executable, "-m", "moco_engine", *TINY, f"train.out_dir={tmp_path / 'run'}",
                        "train.resume=auto", "model.norm=group"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "model.norm 'batch' (checkpoint) vs 'group' (config)" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("precision,dtype", [("fp32", None), ("bf16", torch.bfloat16)])
def test_evaluation_runs_at_the_runs_precision(tmp_path, monkeypatch, precision, dtype):
    seen = []
    monkeypatch.setattr("moco_engine.evaluation.monitor.knn_monitor", lambda *args: seen.append(args[-1]) or {})
    trainer = Trainer(tiny(tmp_path, f"train.precision={precision}", "train.device=cpu"))
    trainer.evaluate_knn()
    assert seen == [dtype]


def test_in_batch_negatives_build_no_key_encoder(tmp_path):
    trainer = Trainer(tiny(tmp_path, "negatives.kind=in_batch"))
    assert trainer.encoder_k is None and trainer.state_dict()["encoder_k"] is None


@pytest.mark.fault("data")
def test_missing_data_folder_exits_2_naming_the_path(tmp_path):
    r = subprocess.run([sys.executable, "-m", "moco_engine", *TINY, "data.name=imagefolder",
                        f"data.root={tmp_path / 'absent'}", f"train.out_dir={tmp_path / 'run'}"], capture_output=True, text=True)
    assert r.returncode == 2 and str(tmp_path / "absent") in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # the 2-rank stop mid-epoch (test_distributed) and the kNN-time stop (test_faults) stay
@pytest.mark.fault("signals")
def test_sigterm_saves_mid_epoch_and_the_resumed_run_matches_a_straight_one(tmp_path):
    extra = ["data.synthetic_size=400", "train.steps_per_epoch=0", "train.log_every=1", "eval.knn_every=0"]
    straight = Trainer(tiny(tmp_path / "a", *extra))  # 2 epochs of 25 steps, uninterrupted
    straight.fit()

    run = tmp_path / "b" / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "moco_engine", *TINY, *extra, f"train.out_dir={run}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and len(records(run, "step")) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "train.resume=auto" in err and "Traceback" not in err
    _, state = latest_checkpoint(run)
    assert state["epoch"] == 0 and 0 < state["step_in_epoch"] < 25  # saved mid-epoch

    resumed = Trainer(tiny(tmp_path / "b", *extra, "train.resume=auto"))
    resumed.fit()
    assert resumed.step == straight.step == 50
    for a, b in zip(straight.encoder_q.state_dict().values(), resumed.encoder_q.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.encoder_k.state_dict().values(), resumed.encoder_k.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(straight.negatives.keys, resumed.negatives.keys)


@pytest.mark.slow  # a run to divergence; -m fault runs it
@pytest.mark.fault("nonfinite")
def test_a_diverging_run_stops_naming_the_step_and_keeps_its_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "moco_engine", *TINY, f"train.out_dir={run}", "train.log_every=1"]
    assert subprocess.run([*base, "train.epochs=1"], capture_output=True, text=True).returncode == 0
    good = checkpoint_files(run)
    before = good[-1].read_bytes()
    r = subprocess.run([*base, "train.epochs=3", "train.resume=auto", "optim.lr=1e30"], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    line = [x for x in r.stderr.strip().splitlines() if not x.startswith("warning:")]  # e.g. the collapse warning
    assert len(line) == 1 and "non-finite loss" in line[0] and "step" in line[0] and good[-1].name in line[0]
    assert checkpoint_files(run) == good and good[-1].read_bytes() == before
