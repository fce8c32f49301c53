"""Shards of image–caption pairs (issue 42, item 1): moco-shard writes `<key>.jpg` and `<key>.txt`
(all of an image's captions, one a line) from a Karpathy folder or archive and from a CSV/TSV;
img2dataset's shards (a caption a sample) read the same way; data.name=shards on them gives
method=itc exactly the pairs source's batches, on every image path, data.decode=gpu included
(run here on the CPU), and a resumed run ends bit-identical."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch
from conftest import ROOT
from test_pairs import PAIRS_TINY, as_tar, bad_json, captions_of, karpathy, table

from moco_engine.config.loading import load_config
from moco_engine.config.schema import UserError
from moco_engine.data.errors import DataError
from moco_engine.data.loaders import build_loaders
from moco_engine.data.shards.reader import MANIFEST
from moco_engine.data.shards.writer import write_shards
from moco_engine.run.trainer import Trainer

# method=itc at its smallest: a one-layer text tower, ALBEF's queue with distillation, 2 steps of 8 an epoch.
ITC = ["method=itc", "negatives.kind=queue", "loss.distill_alpha=0.4", "text_model.params.layers=1",
       "text_model.params.hidden=32", "text_model.params.heads=2", "text_model.params.intermediate=64",
       "optim.batch_size=8", "data.text.vocab_size=64", "eval.retrieval_split=val"]


@pytest.fixture(scope="module")
def pair_shards(tmp_path_factory):
    """A Karpathy folder (20 train, 3 val, 3 test images, 3 captions each) and its shards of 8."""
    base = tmp_path_factory.mktemp("pairs")
    root = karpathy(base / "k")
    write_shards(root, base / "out", shard_size=8, progress=False)
    return root, base / "out"


def config(tmp_path, name, root, *extra):
    return load_config([], [*PAIRS_TINY, *ITC, f"data.name={name}", f"data.root={root}",
                            f"train.out_dir={tmp_path / 'run'}", *extra])


def moco_shard(monkeypatch, capsys, *args):
    """``moco-shard ARGS`` in this process: (exit code, stdout, stderr)."""
    from moco_engine.tools.shard import shard_main

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # the command sets its own
    capsys.readouterr()
    code = shard_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def members(shard):
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def img2dataset_shard(path, first, count, captions=True, empty=()):
    """A shard as img2dataset writes one: `<key>.jpg`, `<key>.txt` (one caption), `<key>.json`."""
    with tarfile.open(path, "w") as tar:
        for i in range(first, first + count):
            image = io.BytesIO()
            from PIL import Image

            Image.new("RGB", (40, 36), ((37 * i) % 256, (91 * i) % 256, 90)).save(image, "JPEG")
            files = {"jpg": image.getvalue(), "json": json.dumps({"key": f"{i:09d}"}).encode()}
            if captions:
                files["txt"] = b"  \n" if i in empty else captions_of(i, 1)[0].encode()
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------------------------------------- moco-shard
def test_moco_shard_writes_the_same_pair_shards_from_each_layout(pair_shards, tmp_path, monkeypatch, capsys):
    root, shards = pair_shards
    manifest = json.loads((shards / MANIFEST).read_text())
    assert manifest["captions"] is True and manifest["classes"] == []
    assert {s: e["items"] for s, e in manifest["splits"].items()} == {"test": 3, "train": 20, "val": 3}
    assert [sh["nsamples"] for sh in manifest["splits"]["train"]["shards"]] == [8, 8, 4]
    assert np.load(shards / "train" / "targets.npy").tolist() == [-1] * 20
    shard = members(shards / "train" / "shard-000001.tar")  # items 8..15: no .cls, the bytes as they were
    assert sorted(shard)[:2] == ["000000008.jpg", "000000008.txt"] and not any(n.endswith(".cls") for n in shard)
    assert shard["000000009.jpg"] == (root / "images" / "9.jpg").read_bytes()
    assert shard["000000009.txt"].decode() == "".join(f"{c}\n" for c in captions_of(9))  # all of them, one a line
    assert (shards / "val" / "shard-000000.tar").is_file() and (shards / "test" / "index.json").is_file()
    write_shards(as_tar(root, tmp_path / "k.tar.gz"), tmp_path / "from_tar", shard_size=8, progress=False)
    csv = table(tmp_path / "t")
    csv.write_text(csv.read_text().replace("filepath,title,split", "image,text,part", 1))  # other column names
    code, out, err = moco_shard(monkeypatch, capsys, csv, tmp_path / "from_csv", "--shard-size", 8, "--image-key", "image",
                                "--caption-key", "text", "--split-key", "part", "--quiet")
    assert code == 0, err
    assert f"{tmp_path / 'from_csv' / 'train'}: 20 images and their captions in 3 shards" in out
    for other in ("from_tar", "from_csv"):  # the same items, images, captions and keys: the same bytes
        for name in ("train/shard-000002.tar", "val/shard-000000.tar", "test/shard-000000.tar"):
            assert (tmp_path / other / name).read_bytes() == (shards / name).read_bytes(), (other, name)
    code, _, err = moco_shard(monkeypatch, capsys, csv, tmp_path / "from_csv", "--quiet")  # the default keys
    assert code == 2 and err.strip().splitlines() == [f"error: {csv}: no column 'filepath' (data.pairs.image_key; "
                                                      "its columns: image, text, part)"]


def test_moco_shard_refuses_bad_pairs_in_one_line(tmp_path, monkeypatch, capsys):
    root = bad_json(tmp_path, lambda d: d["images"][1]["sentences"][0].update(raw=" "))
    code, _, err = moco_shard(monkeypatch, capsys, root, tmp_path / "out", "--quiet")
    assert code == 2 and err.strip().splitlines() == [
        f"error: {root / 'dataset_fake.json'}, images[1]: image images/1.jpg's caption 0 is empty"]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- reading
def test_caption_shards_give_the_pairs_sources_batches_and_ranked_splits(pair_shards, tmp_path):
    root, out = pair_shards
    pairs = build_loaders(config(tmp_path, "pairs", root), torch.device("cpu"))
    shards = build_loaders(config(tmp_path, "shards", out), torch.device("cpu"))
    assert shards.source.pairs and shards.monitor == "pairs" and shards.input_shape == pairs.input_shape
    assert shards.source_state()["tokenizer"] == pairs.source_state()["tokenizer"]
    assert shards.source.ranked_splits() == ("test", "train", "val")
    for epoch in (0, 1):
        pairs.sampler.set_epoch(epoch)
        shards.sampler.set_epoch(epoch)
        for ((x, c), _, i), ((y, d), _, j) in zip(pairs.train, shards.train, strict=True):
            assert torch.equal(x, y) and torch.equal(i, j) and all(torch.equal(c[k], d[k]) for k in c)
    for split in ("val", "train"):
        (images, captions), (images2, captions2) = (s.source.ranked_pairs(split, 8) for s in (pairs, shards))
        assert torch.equal(captions.ids, captions2.ids) and torch.equal(captions.owners(), captions2.owners())
        assert all(torch.equal(a[0], b[0]) for a, b in zip(images, images2, strict=True))


def test_decode_gpu_gives_each_image_its_first_view_and_the_same_captions(pair_shards, tmp_path):
    """data.decode=gpu on the CPU (torchvision's decoder there): the device-made first view of
    each image, beside the very captions the CPU path draws."""
    _, out = pair_shards
    cpu = build_loaders(config(tmp_path, "shards", out), torch.device("cpu"))
    gpu = build_loaders(config(tmp_path, "shards", out, "data.decode=gpu"), torch.device("cpu"))
    assert gpu.input_shape == cpu.input_shape and gpu.steps_per_epoch == cpu.steps_per_epoch == 2
    assert cpu.preview(4, 0).shape == gpu.preview(4, 0).shape == (8, 3, 32, 32)  # the views a step sees
    for epoch in (0, 1):
        cpu.sampler.set_epoch(epoch)
        gpu.sampler.set_epoch(epoch)
        for ((x, c), _, i), ((y, d), _, j) in zip(cpu.train, gpu.train, strict=True):
            assert y.shape == x.shape == (8, 3, 32, 32) and torch.equal(i, j)
            assert all(torch.equal(c[k], d[k]) for k in c)
    views = gpu.train.batches  # decode.StreamTwoViews under the captions: its pairs' first views
    gpu.sampler.set_epoch(1)
    (first, _), _, _ = next(iter(views))
    (y, _), _, _ = next(iter(gpu.train))
    assert torch.equal(first, y)


def test_img2dataset_shards_are_an_item_a_sample_with_its_caption(tmp_path, capfd):
    listing = tmp_path / "shards.txt"
    img2dataset_shard(tmp_path / "00000.tar", 0, 12)
    img2dataset_shard(tmp_path / "00001.tar", 12, 8)
    listing.write_text("00000.tar\n00001.tar\n")
    loaders = build_loaders(config(tmp_path, "shards", listing, "eval.retrieval_split=train"), torch.device("cpu"))
    source = loaders.source
    assert loaders.num_items == 20 and source.captions.counts.tolist() == [1] * 20 and loaders.monitor == "pairs"
    assert source.splits.train.captions[13] == (captions_of(13, 1)[0],)
    assert source.ranked_splits() == ("train",)
    images, captions = source.ranked_pairs("train", 8)
    assert len(captions.ids) == 20 and sum(len(x) for x, _, _ in images) == 20
    with pytest.raises(DataError, match=r"shards.txt: a .txt of shards is the training split alone, so it has no split 'val'"):
        source.ranked_pairs("val", 8)
    capfd.readouterr()
    moco = build_loaders(config(tmp_path, "shards", listing, "method=moco", "queue.size=16"), torch.device("cpu"))
    assert not moco.source.captioned and moco.monitor == "knn" and isinstance(moco.input_shape, tuple)
    assert capfd.readouterr().err.strip().splitlines() == [
        "warning: data.name=shards: method=moco trains on the 20 images of split 'train' alone; their 20 captions are unused"]


def test_bad_caption_shards_are_one_line(tmp_path):
    listing = tmp_path / "shards.txt"
    img2dataset_shard(tmp_path / "a.tar", 0, 10, empty={4})
    listing.write_text("a.tar\n")
    with pytest.raises(DataError, match=r"shards.txt: sample 000000004 of shard .*a.tar: its .txt holds no caption") as e:
        build_loaders(config(tmp_path, "shards", listing), torch.device("cpu"))
    assert str(e.value).startswith(str(listing)) and "\n" not in str(e.value)
    img2dataset_shard(tmp_path / "a.tar", 0, 10)
    img2dataset_shard(tmp_path / "b.tar", 10, 10, captions=False)
    listing.write_text("a.tar\nb.tar\n")
    with pytest.raises(DataError, match=r"sample 000000000 of shard .*a.tar has a .txt of captions and sample "
                                        r"000000010 of shard .*b.tar has none: the samples have captions all or none"):
        build_loaders(config(tmp_path, "shards", listing), torch.device("cpu"))
    listing.write_text("b.tar\n")  # no captions at all: an image set, which method=itc cannot train on
    with pytest.raises(UserError, match=r"'method' = 'itc': .*data.name=shards has no captions"):
        build_loaders(config(tmp_path, "shards", listing), torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- runs
class SignalledAtFirstBatch:
    """Training batches during whose first a stop signal comes (SIGTERM, 15): the run stops
    after its first step, mid-epoch (one epoch of steps is all the test trains)."""

    def __init__(self, batches, signals):
        self.batches, self.signals = batches, signals

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.signals.signum = self.signals.signum or 15
            yield batch


@pytest.mark.parametrize("decode", ["cpu", pytest.param("gpu", marks=pytest.mark.slow)])  # gpu: on the CPU here
def test_an_itc_run_on_caption_shards_stopped_mid_epoch_resumes_bit_identical(pair_shards, tmp_path, monkeypatch, decode):
    import moco_engine.data.pairs.captions as captions

    _, out = pair_shards
    extra = ("train.epochs=1", f"data.decode={decode}")  # 2 steps
    straight = Trainer(config(tmp_path / "a", "shards", out, *extra))
    final = straight.fit()
    assert final["steps"] == 2 and "rsum" in final
    assert (tmp_path / "a" / "run" / "tokenizer.json").read_text() == straight.loaders.source_state()["tokenizer"]
    stopped = Trainer(config(tmp_path / "b", "shards", out, *extra))
    stopped.prepare_run_dir()
    stopped.loaders.train = SignalledAtFirstBatch(stopped.loaders.train, stopped.signals)
    stopped.train_epoch()  # stops after its first step: mid-epoch
    assert stopped.step_in_epoch == 1
    stopped.save()
    del stopped

    def no_training(*args):
        raise AssertionError("a resume trained its tokenizer again")

    monkeypatch.setattr(captions, "train_wordpiece", no_training)  # the resume reads the checkpoint's
    resumed = Trainer(config(tmp_path / "b", "shards", out, *extra, "train.resume=auto"))
    assert resumed.fit() == final
    for a, b in zip(straight.encoder_q.state_dict().values(), resumed.encoder_q.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.encoder_k.state_dict().values(), resumed.encoder_k.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.negatives.state_dict().values(), resumed.negatives.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match=r"another tokenizer .*data.text.vocab_size 64 \(checkpoint\) vs 80 \(config\)"):
        Trainer(config(tmp_path / "b", "shards", out, *extra, "train.resume=auto", "data.text.vocab_size=80"))


@pytest.mark.slow  # a subprocess; the message is checked in process in the default run
def test_an_empty_caption_in_a_shard_exits_2_in_one_line_through_moco_train(tmp_path):
    img2dataset_shard(tmp_path / "a.tar", 0, 20, empty={7})
    (tmp_path / "shards.txt").write_text("a.tar\n")
    r = subprocess.run([sys.executable, "-m", "moco_engine", *PAIRS_TINY, *ITC, "data.name=shards",
                        f"data.root={tmp_path / 'shards.txt'}", f"train.out_dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "sample 000000007 of shard" in lines[0], r.stderr
