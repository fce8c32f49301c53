"""torchrun with 2 CPU processes (gloo): one queue, identical on every rank; a 2-rank run equals a
1-rank run of twice the batch where the mathematics says so; the sharded bank refresh; a crashed
rank restarted by torchrun; a ragged last batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY

pytestmark = pytest.mark.distributed
WORKER = str(ROOT / "tests" / "dist_worker.py")


def torchrun(out, *overrides, nproc=2, extra=(), crash_at=None, stop_at=None, wandb="disabled", rc=0, module=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra, WORKER]
    if module is not None:
        cmd += ["--import", str(module)]
    if crash_at is not None:
        cmd += ["--crash-at-step", str(crash_at)]
    if stop_at is not None:
        cmd += ["--stop-at-step", str(stop_at)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": wandb, "WANDB_SILENT": "true"}
    r = subprocess.run([*cmd, str(out), *TINY, "train.device=cpu", *overrides, "train.overwrite=true"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == rc if rc is not None else r.returncode != 0, r.stdout[-3000:] + r.stderr[-3000:]
    if rc != 0:
        return None, r
    return [torch.load(out / f"rank{i}.pt", weights_only=True) for i in range(nproc)], r


# BatchNorm with 2 split-BN slices, shuffle-BN across the ranks (TINY's model), 2 epochs of 3 steps.
EXACT = ["model.bn=shuffle", "model.norm=batch", "model.bn_splits=2"]


@pytest.fixture(scope="module")
def straight_cpu(tmp_path_factory):
    """A 2-rank run left alone (the CPU data path): the reference of the exactness tests."""
    out = tmp_path_factory.mktemp("straight")
    ranks, _ = torchrun(out, *EXACT)
    return out, ranks


def assert_same_ranks(a, b):
    """Two runs' dumps hold bit-identical state on every rank: encoders with each rank's own
    BatchNorm statistics, the negatives, the optimizer, and every rank's random streams."""
    for ra, rb in zip(a, b):
        for section in ("encoder_q", "encoder_k", "negatives"):
            assert (ra[section] is None) == (rb[section] is None), section
            for name, t in (ra[section] or {}).items():
                u = rb[section][name]  # NaN equals NaN: the memory bank's log Z before NCE's first estimate
                assert t.shape == u.shape and bool(((t == u) | (t.isnan() & u.isnan())).all()), f"{section}.{name}"
        assert all(torch.equal(x, y) for x, y in zip(ra["momentum_buffers"], rb["momentum_buffers"]))
        assert torch.equal(ra["torch_rng"], rb["torch_rng"]) and ra["python_draw"] == rb["python_draw"]


def stopped_and_resumed(out, *overrides, module=None, keep=None):
    """The run of ``straight_cpu``, SIGTERM'd on rank 1 in step 4 and resumed from its checkpoint
    (the stopped run's folder first copied to ``keep``, if given)."""
    _, r = torchrun(out, *EXACT, *overrides, stop_at=4, rc=None, module=module)  # the workers exit 143, torchrun 1
    assert "stopped by SIGTERM after step 4" in r.stderr
    from moco_engine.run.checkpoint import latest_checkpoint

    state = latest_checkpoint(out / "run")[1]
    assert state["step"] == 4 and state["step_in_epoch"] == 1 and len(state["ranks"]) == 2  # mid-epoch, both ranks'
    if keep is not None:
        shutil.copytree(out / "run", keep)
    resumed, _ = torchrun(out, *EXACT, *overrides, "train.resume=auto", module=module)
    return resumed


def test_a_two_rank_run_stopped_mid_epoch_and_resumed_is_bit_identical(tmp_path, straight_cpu):
    assert_same_ranks(straight_cpu[1], stopped_and_resumed(tmp_path, keep=tmp_path / "stopped"))
    assert not torch.equal(straight_cpu[1][0]["torch_rng"], straight_cpu[1][1]["torch_rng"])  # each rank its own
    # The same mid-epoch checkpoint on one process: the epoch's rest would be dealt out anew.
    r = subprocess.run([sys.executable, "-m", "moco_engine", *TINY, *EXACT, "train.device=cpu",
                        f"train.out_dir={tmp_path / 'stopped'}", "train.resume=auto"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "stopped mid-epoch (after step 1 of its epoch) on 2 process(es); on 1 the epoch's remaining items" in r.stderr


@pytest.mark.slow  # three more launches
def test_the_device_pipeline_stopped_and_resumed_under_torchrun_is_bit_identical(tmp_path):
    straight, _ = torchrun(tmp_path / "straight", *EXACT, "data.pipeline=device")
    assert_same_ranks(straight, stopped_and_resumed(tmp_path / "stopped", "data.pipeline=device"))


@pytest.mark.slow  # three launches that import transformers
def test_a_text_run_stopped_mid_epoch_under_torchrun_and_resumed_is_bit_identical(tmp_path):
    """Text through the same torchrun: spans cut on each rank from its own (seed, epoch, item)
    draws, shuffle-BN's permutation of dict views, AdamW; SIGTERM'd in step 4 and resumed with
    the tokenizer the checkpoint holds."""
    from test_text_run import TEXT

    text = [*TEXT, "model.bn=shuffle", "optim.name=adamw", "optim.lr=0.001", "queue.size=48", "eval.knn_every=0"]
    straight, _ = torchrun(tmp_path / "straight", *text)
    resumed = stopped_and_resumed(tmp_path / "stopped", *text)
    assert_same_ranks(straight, resumed)
    assert straight[0]["final"] == resumed[0]["final"] and "ndcg@10" in straight[0]["final"]
    assert resumed[0]["tokenizer"] == resumed[1]["tokenizer"] == straight[0]["tokenizer"]
    assert straight[0]["seen"] != straight[1]["seen"]  # each rank its own chunks


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    """moco-shard's folder of 120 JPEGs (3 classes) and 24 test ones."""
    from test_shards import image_tree

    from moco_engine.data.shards.writer import write_shards

    base = tmp_path_factory.mktemp("shards")
    write_shards(image_tree(base / "src"), base / "out", shard_size=16, progress=False)
    return base / "out"


@pytest.mark.slow  # three launches; one process's exact resume over shards is in the default run (test_shards.py)
def test_a_shards_run_stopped_mid_epoch_under_torchrun_resumes_bit_identical(tmp_path, shard_root):
    shards = ["data.name=shards", f"data.root={shard_root}", "data.pipeline=cpu"]
    straight, _ = torchrun(tmp_path / "straight", *EXACT, *shards)
    assert_same_ranks(straight, stopped_and_resumed(tmp_path / "stopped", *shards))
    assert straight[0]["seen"] != straight[1]["seen"]  # each rank its own share of the epoch


@pytest.mark.slow  # a torchrun launch with a restart
def test_a_shards_rank_killed_by_sigkill_is_restarted_and_ends_bit_identical(tmp_path, shard_root):
    shards = ["data.name=shards", f"data.root={shard_root}", "data.pipeline=cpu"]
    straight, _ = torchrun(tmp_path / "straight", *EXACT, *shards)
    ranks, r = torchrun(tmp_path / "crashed", *EXACT, *shards, crash_at=5, extra=["--max-restarts=1"])
    assert "simulated crash of rank 1 at step 5" in r.stderr + r.stdout and "resumed from" in r.stdout
    assert_same_ranks(straight, ranks)


# torchrun's agent keeps one store across rounds: before distributed.setup named each round's key
# space, the restarted rank 0 often read the crashed rank 1's gloo address and was refused or hung.
@pytest.mark.slow  # a torchrun launch with a restart; the SIGTERM stop and resume stay in the default run
def test_a_rank_killed_by_sigkill_is_restarted_and_ends_bit_identical(tmp_path, straight_cpu):
    ranks, r = torchrun(tmp_path, *EXACT, crash_at=5, extra=["--max-restarts=1"])
    assert "simulated crash of rank 1 at step 5" in r.stderr + r.stdout
    assert "resumed from" in r.stdout and ranks[0]["step"] == 6
    assert_same_ranks(straight_cpu[1], ranks)
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"kind": "final"') == 1


def test_under_batchnorm_the_monitors_knn_is_what_moco_eval_gets_from_the_checkpoint(straight_cpu, tmp_path):
    out, (r0, r1) = straight_cpu
    assert r0["knn"] == r1["knn"]  # every shard encoded with the same (mean) statistics
    run = tmp_path / "run"
    shutil.copytree(out / "run", run)
    r = subprocess.run([sys.executable, "-c", "import sys; from moco_engine.tools.cli import eval_main; sys.exit(eval_main(sys.argv[1:]))",
                        "knn", str(run), "train.device=cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(next(run.glob("checkpoints/*.knn.json")).read_text())
    assert result["knn_top1"] == r0["knn"]["knn_top1"] and result["knn_top5"] == r0["knn"]["knn_top5"]


@pytest.mark.slow  # two more launches
def test_resuming_on_another_number_of_processes_says_what_it_does(straight_cpu, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight_cpu[0] / "run", run)
    r = subprocess.run([sys.executable, "-m", "moco_engine", *TINY, "train.device=cpu", f"train.out_dir={run}",
                        "train.resume=auto", "train.epochs=3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "written by 2 process(es), resumed on 1" in r.stdout and "not bit-identical" in r.stdout


def ring(size: int, batches: list[list[int]]) -> list[int]:
    """The index buffer of a FIFO queue of `size` slots after enqueueing `batches` in order."""
    slots, ptr = [-1] * size, 0
    for batch in batches:
        for i in batch:
            slots[ptr] = i
            ptr = (ptr + 1) % size
    return slots


def test_queue_is_identical_on_both_ranks_and_holds_the_gathered_keys_in_order(tmp_path):
    (r0, r1), _ = torchrun(tmp_path, "queue.size=50")
    assert torch.equal(r0["negatives"]["keys"], r1["negatives"]["keys"])
    assert torch.equal(r0["negatives"]["index"], r1["negatives"]["index"])
    assert r0["seen"] != r1["seen"]  # the ranks trained on different items...
    gathered = [a + b for a, b in zip(r0["seen"], r1["seen"])]  # ...enqueued rank 0's, then rank 1's
    assert r0["negatives"]["index"].tolist() == ring(50, gathered)


@pytest.mark.slow  # two launches: equal only to rounding, not an exactness claim
def test_two_ranks_of_batch_b_equal_one_rank_of_batch_2b(tmp_path):
    # GroupNorm and a linear head: no statistic crosses samples, so splitting the batch over
    # ranks changes nothing but summation order. No shuffle (its permutation is random).
    same = ["model.norm=group", "model.bn=plain", "model.bn_splits=1", "model.head=linear", "queue.size=64"]
    (two, _), _ = torchrun(tmp_path / "two", *same, "optim.batch_size=16")
    (one,), _ = torchrun(tmp_path / "one", *same, "optim.batch_size=32", nproc=1)
    assert two["step"] == one["step"] == 6
    assert [len(b) for b in two["seen"]] == [16] * 6 and [len(b) for b in one["seen"]] == [32] * 6
    for name, weight in one["encoder_q"].items():
        torch.testing.assert_close(two["encoder_q"][name], weight, rtol=1e-4, atol=1e-5, msg=name)
    # The queue holds the same keys, in another slot order.
    keys = lambda r: r["negatives"]["keys"][r["negatives"]["index"].argsort()]  # noqa: E731
    torch.testing.assert_close(keys(two), keys(one), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # 19 s; the two-rank stop and resume stays in the default run
@pytest.mark.parametrize("pipeline", ["cpu", "device"])
def test_sharded_bank_refresh_gives_every_rank_the_same_bank(tmp_path, pipeline):
    # 97 items: shards of 49, the second padded with a repeat of item 96 (equal batches on every
    # rank, as SyncBN needs), cut off again after the gather.
    (r0, r1), _ = torchrun(tmp_path, "negatives.kind=memory_bank", "memory_bank.update=refresh", "model.norm=group",
                           "model.bn=plain", "model.head=linear", "model.bn_splits=1", "data.synthetic_size=97",
                           f"data.pipeline={pipeline}", "eval.batch_size=16")
    assert r0["negatives"]["bank"].shape[0] == 97
    assert r0["shard_batches"] == r1["shard_batches"] == [16, 16, 16, 1]
    # kNN from test and train splits encoded in shards equals kNN on the whole splits.
    assert r0["knn"] == r1["knn"] == r0["knn_unsharded"]
    assert torch.equal(r0["negatives"]["bank"], r1["negatives"]["bank"])
    # Each rank encoded half the items; together they equal one full encoding by f_k.
    torch.testing.assert_close(r0["negatives"]["bank"], r0["full_encoding"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # a torchrun launch; test_negatives keeps the ragged batch in one process
def test_a_ragged_last_batch_with_drop_last_off_and_only_rank_0_logs(tmp_path):
    # 100 items over 2 ranks: 50 each, batches 16, 16, 16, 2; shuffle-BN across ranks on.
    (r0, r1), _ = torchrun(tmp_path, "data.synthetic_size=100", "data.drop_last=false", "train.steps_per_epoch=0",
                           "train.epochs=1", "queue.size=40", "train.log_every=1", wandb="offline")
    assert [len(b) for b in r0["seen"]] == [16, 16, 16, 2] == [len(b) for b in r1["seen"]]
    assert r0["size_exchanges"] == r1["size_exchanges"] == 0  # equal shares: no per-step host sync
    assert torch.equal(r0["negatives"]["keys"], r1["negatives"]["keys"])
    assert sorted(sum(r0["seen"], []) + sum(r1["seen"], [])) == list(range(100))
    # One writer: each step logged once (averaged over the ranks), one W&B run.
    import json

    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert steps == [1, 2, 3, 4]
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.slow  # about a minute: two torchrun launches
def test_sigterm_to_torchrun_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path):
    import json
    import signal
    import time

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    args = [*TINY, "train.device=cpu", f"train.out_dir={run}", "data.synthetic_size=640", "train.steps_per_epoch=0",
            "train.log_every=2", "train.epochs=1"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "moco_engine", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"step": 2' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # as a scheduler does: torchrun passes it on to every worker
    _, err = proc.communicate(timeout=120)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    stopped = [r for r in records if r["kind"] == "stopped"]
    assert len(stopped) == 1, err[-2000:]  # rank 0 alone writes, once
    from moco_engine.run.checkpoint import latest_checkpoint

    state = latest_checkpoint(run)[1]
    assert state["step"] == stopped[0]["step"] and state["step_in_epoch"] == state["step"] < 20  # mid-epoch
    # Both ranks stopped after that same step: a resumed run carries on from it to the end.
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "moco_engine", *args, "train.resume=auto"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert latest_checkpoint(run)[1]["step"] == 20
