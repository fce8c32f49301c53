import json
import time

import pytest
import torch

from moco_engine.tools.bench import CASES, bench_main
from moco_engine.tools.opcount import count_ops, step_counters
from moco_engine.tools.timing import paired_medians


def test_moco_bench_runs_the_tiny_case_and_prints_its_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the benchmark's Trainer writes under ./runs/bench
    out = tmp_path / "bench.json"
    code = bench_main(["tiny", "--device", "cpu", "--repeats", "2", "--warmup", "1", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| supervised |" in printed and "| MoCo |" in printed
    assert "MoCo / supervised:" in printed and "(median of 2 paired rounds)" in printed
    for piece in ("key forward", "EMA", "shuffle", "queue logits", "enqueue"):
        assert f"| {piece} |" in printed
    (r,) = json.loads(out.read_text())
    assert r["case"] == "tiny" and r["batch"] == CASES["tiny"].batch and r["device"] == "cpu"
    assert r["split_bn"] == "per_slice"  # what --split-bn auto stands for on CPU, not "auto"
    assert r["supervised_s"] > 0 and r["moco_s"] > 0 and r["ratio"] > 0
    assert r["supervised_peak_gib"] is None  # no allocator statistics on CPU: "n/a", not a made-up 0
    assert set(r["breakdown_s"]) == {"key forward", "EMA", "shuffle", "queue logits", "enqueue"}
    # An eager case counts each step's operators: MoCo's (two encoders, EMA, queue) outnumber
    # the supervised step's, and the table says so.
    assert r["ops"]["moco"]["compute"] > r["ops"]["supervised"]["compute"] > 100
    assert "| supervised | " in printed.split("| step | operators")[1]


def test_moco_bench_times_a_moco_v3_vit_case_against_its_floor_of_eight_thirds(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench.json"
    assert bench_main(["vit-t-cifar", "--device", "cpu", "--batch", "4", "--repeats", "1", "--warmup", "1",
                       "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert (r["method"], r["arch"], r["patch_size"], r["batch"]) == ("moco_v3", "vit_tiny", 4, 4)
    assert r["floor"] == 8 / 3 and set(r["breakdown_s"]) == {"key forward", "EMA"}
    # Two views through f_q (forward and backward) and f_k (forward): over twice a supervised step's operators.
    assert r["ops"]["moco"]["compute"] > 2 * r["ops"]["supervised"]["compute"]
    printed = capsys.readouterr().out
    assert "vit_tiny/4, 32 px, batch 4, MoCo v3 (the batch's keys)" in printed
    assert "the floor is 2.67 (two views through f_q and f_k)" in printed


def test_moco_bench_times_the_text_step_in_tokens_per_second(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench.json"
    assert bench_main(["bert-scifact", "--device", "cpu", "--batch", "8", "--repeats", "1", "--warmup", "1",
                       "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert (r["arch"], r["tokens"], r["batch"], r["head"]) == ("bert", 48, 8, "none")
    assert r["floor"] == 4 / 3 and {"key forward", "queue logits", "enqueue"} <= set(r["breakdown_s"])
    # f_q forward and backward, f_k forward, the EMA and the queue: more kernels than the supervised step.
    assert r["ops"]["moco"]["compute"] > r["ops"]["supervised"]["compute"]
    printed = capsys.readouterr().out
    assert "bert (2 layers x 128), 48 tokens a view, batch 8, K 4096" in printed
    assert "| step | ms (median) | chunks/s | tokens/s | peak memory GiB |" in printed


def test_count_ops_counts_host_reads_where_the_dispatcher_cannot_see_them():
    x = torch.randn(4, 3)
    assert count_ops(lambda: x.sum(0) * 2).host_reads == {}
    # A planted tolist: a CPU tensor's is no operator, and counts once.
    assert count_ops(lambda: (x.sum(0) * 2).tolist()).host_reads == {"tolist": 1}
    assert count_ops(lambda: float(x.sum())).host_reads == {"_local_scalar_dense": 1}
    assert count_ops(lambda: bool(x.abs().sum() > 0) and x.nonzero()).host_reads == {"_local_scalar_dense": 1, "nonzero": 1}
    assert count_ops(lambda: x.sum(0).cpu().numpy()).host_reads == {"cpu": 1}  # one read, then a host copy
    model = torch.nn.Linear(3, 2)
    adamw = torch.optim.AdamW(model.parameters())

    def step():
        model(x).sum().backward()
        adamw.step()

    step()  # AdamW reads its step counters (host tensors on a GPU too): they are left out when named
    plain, named = count_ops(step), count_ops(step, step_counters(adamw))
    assert plain.host_reads and named.host_reads == {}
    # ... and their operators (an increment and a read per parameter) launch no kernel anywhere.
    assert named.host == 2 * len(step_counters(adamw)) and named.compute == plain.compute - named.host


def test_count_ops_counts_the_backward_and_sorts_views_from_kernels():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    forward = count_ops(lambda: conv(x).flatten().sum())
    both = count_ops(lambda: conv(x).flatten().sum().backward())
    assert forward.by_name["aten.convolution.default"] == 1 and "aten.convolution_backward.default" not in forward.by_name
    assert both.by_name["aten.convolution_backward.default"] == 1  # autograd's engine carries the mode
    assert forward.views >= 1  # flatten is a view: no kernel
    assert forward.compute == forward.total - forward.views - forward.allocations == 2  # convolution, sum
    assert both.compute > forward.compute


def test_moco_bench_ops_counts_each_split_bn_form_without_timing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ops.json"
    assert bench_main(["tiny", "--device", "cpu", "--ops", "--bn-splits", "4", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert "supervised_s" not in r  # counted, not timed
    rows = r["ops_by_form"]
    assert list(rows) == ["supervised", "MoCo, plain", "MoCo, split-BN per_slice", "MoCo, split-BN one_pass",
                          "MoCo, split-BN strided", "MoCo, split-BN grouped"]
    assert all(row["batch"] == 32 for row in rows.values())
    compute = {name: row["compute"] for name, row in rows.items()}
    # Split-BN adds operators to plain BN; per slice it adds them 4 times, strided once per layer.
    assert compute["supervised"] < compute["MoCo, plain"] < compute["MoCo, split-BN grouped"]
    assert compute["MoCo, split-BN grouped"] < compute["MoCo, split-BN strided"] < compute["MoCo, split-BN per_slice"]
    # Issue 34: the GPU's form with no copy to NCHW and back (its ratio to plain BN is a
    # benchmark figure: BENCHMARKS.md).
    assert "aten.clone.default" not in rows["MoCo, split-BN grouped"]["top"]
    # No step reads the device, whatever the form (the tiny case's SGD has no step counters).
    assert all(row["host_reads"] == 0 for row in rows.values()), {n: r["host_read_kinds"] for n, r in rows.items()}
    printed = capsys.readouterr().out
    assert "operators per step" in printed and "| MoCo, split-BN strided | 32 |" in printed


def test_moco_bench_ops_counts_the_itc_step_of_two_towers_without_host_reads(tmp_path, monkeypatch, capsys):
    # The Flickr8k recipe's two towers at a batch of 4 on a generated pairs folder: the ITC step
    # (both towers and their momentum copies, two queues, distillation, a learned T) against the
    # two towers' supervised steps together, and no value read to the host.
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ops.json"
    assert bench_main(["itc-flickr-cpu", "--device", "cpu", "--ops", "--batch", "4", "--queue", "64",
                       "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert (r["method"], r["pairs"], r["image_size"], r["tokens"]) == ("itc", True, 64, 27)
    rows = r["ops_by_form"]
    assert list(rows) == ["supervised", "ITC, plain"] and rows["ITC, plain"]["batch"] == 4
    assert rows["ITC, plain"]["compute"] > rows["supervised"]["compute"] > 100
    assert all(row["host_reads"] == 0 for row in rows.values()), {n: row["host_read_kinds"] for n, row in rows.items()}
    assert (tmp_path / "runs/bench/pairs/dataset_bench.json").is_file()  # its data: generated, never a download
    printed = capsys.readouterr().out
    assert "itc-flickr-cpu: resnet18 and its text tower, 64 px + 27 tokens a caption, operators per step" in printed


def test_cuda_graphs_on_a_cpu_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert bench_main(["tiny", "--device", "cpu", "--cuda-graphs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config key 'train.cuda_graphs' = true: CUDA graphs need one process on a CUDA device")
    assert "\n" not in err


def test_moco_bench_data_mode_times_the_input_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = bench_main(["tiny", "--device", "cpu", "--repeats", "1", "--warmup", "1", "--data",
                       "--pipeline", "device", "--workers", "0", "--bn-splits", "2", "--split-bn", "one_pass"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "split-BN 2 (one_pass)" in printed
    assert "| data |" in printed and "| data + step |" in printed


def test_moco_bench_unknown_case_is_a_one_line_error(capsys):
    assert bench_main(["r18-imagenet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown benchmark case 'r18-imagenet'") and "\n" not in err


def test_paired_medians_takes_the_median_of_per_round_ratios():
    # b always costs twice a, but the machine slows down during the run: every round's ratio is
    # 2, though the medians alone (taken over different rounds) would not say so exactly.
    slowdown = iter([1, 1, 1, 1, 2, 2, 3, 3, 5, 5])  # a, b of the warm-up round, then 4 timed rounds

    def a():
        time.sleep(0.002 * next(slowdown))

    def b():
        time.sleep(0.004 * next(slowdown))

    med_a, med_b, ratio = paired_medians(a, b, repeats=4, warmup=1, device=torch.device("cpu"))
    assert ratio == pytest.approx(2.0, rel=0.25)
    assert med_b > med_a


@pytest.mark.fault("tools")
@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], "--repeats 0: must be >= 1"), (["--warmup", "-1"], "--warmup -1: must be >= 0"),
    (["--pipeline", "gpu"], "--pipeline gpu: must be cpu or device"), (["--device", "banana"], "--device banana"),
    (["--json", "/no/such/folder/out.json"], "--json /no/such/folder/out.json: its folder does not exist"),
])
def test_moco_bench_options_out_of_range_are_one_line_before_any_timing(capsys, args, message):
    assert bench_main(["tiny", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
