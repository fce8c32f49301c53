"""data.name=shards and moco-shard: WebDataset tar shards read through wids, in the engine's own
epoch order (exact resume, stable indices), and every bad input as one line."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY
from PIL import Image

from moco_engine.config.loading import load_config
from moco_engine.data.errors import DataError
from moco_engine.data.loaders import build_loaders
from moco_engine.data.shards.reader import MANIFEST
from moco_engine.data.shards.writer import write_shards
from moco_engine.run.checkpoint import CheckpointError
from moco_engine.run.trainer import Trainer

CLASSES = ("cat", "dog", "owl")


def jpeg(seed: int, size: tuple[int, int] = (32, 32)) -> bytes:
    """A JPEG of smooth random colours (a class's colour plus noise), ``size`` (width, height)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize(size, Image.BILINEAR)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def image_tree(root, per_class=(40, 8), sizes=None):
    """``root/<split>/<class>/<n>.jpg``: per_class train and test images of each class."""
    for split, count in zip(("train", "test"), per_class):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                size = sizes[i % len(sizes)] if sizes else (32, 32)
                (root / split / name / f"{i:04d}.jpg").write_bytes(jpeg(1000 * c + i + (500 if split == "test" else 0), size))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    write_shards(image_tree(base / "src"), base / "out", shard_size=16, progress=False)
    return base / "out"


def config(tmp_path, root, *extra):
    return load_config([], [*TINY, "data.name=shards", f"data.root={root}", f"train.out_dir={tmp_path / 'run'}", *extra])


def moco_shard(*args):
    return subprocess.run([sys.executable, "-c", "import sys; from moco_engine.tools.shard import shard_main; "
                           "sys.exit(shard_main())", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_moco_shard_keeps_every_image_its_class_and_its_bytes(shards, tmp_path):
    manifest = json.loads((shards / MANIFEST).read_text())
    assert manifest["classes"] == list(CLASSES)
    assert {s: e["items"] for s, e in manifest["splits"].items()} == {"test": 24, "train": 120}
    assert [sh["nsamples"] for sh in manifest["splits"]["train"]["shards"]] == [16] * 7 + [8]
    targets = np.load(shards / "train" / "targets.npy")
    assert targets.tolist() == [0] * 40 + [1] * 40 + [2] * 40  # sorted by class, then name
    with tarfile.open(shards / "train" / "shard-000002.tar") as tar:  # items 32..47: the image bytes as they were
        assert tar.extractfile("000000041.jpg").read() == (shards.parent / "src/train/dog/0001.jpg").read_bytes()
        assert tar.extractfile("000000041.cls").read() == b"1"
    index = json.loads((shards / "train" / "index.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and sum(s["nsamples"] for s in index["shardlist"]) == 120


def test_an_archive_gives_the_same_items_as_its_folder(shards, tmp_path):
    archive = tmp_path / "src.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # in a top folder, in sorted order (archive order is item order)
        for path in sorted((shards.parent / "src").rglob("*.jpg")):
            tar.add(path, f"images/{path.relative_to(shards.parent / 'src')}")
    write_shards(archive, tmp_path / "out", shard_size=16, progress=False)
    for split in ("train", "test"):
        assert np.array_equal(np.load(tmp_path / "out" / split / "targets.npy"), np.load(shards / split / "targets.npy"))
    for name in ("train/shard-000003.tar", "test/shard-000001.tar"):
        assert (tmp_path / "out" / name).read_bytes() == (shards / name).read_bytes()


def test_a_stopped_moco_shard_finishes_what_is_missing_and_refuses_another_source(shards, tmp_path):
    out = tmp_path / "out"
    write_shards(shards.parent / "src", out, shard_size=16, progress=False)
    # As if stopped after shard 4: the later shards and their manifest entries are gone.
    manifest = json.loads((out / MANIFEST).read_text())
    kept = manifest["splits"]["train"]["shards"][:5]
    for sh in manifest["splits"]["train"]["shards"][5:]:
        (out / "train" / sh["name"]).unlink()
    manifest["splits"]["train"]["shards"] = kept
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / "train" / "shard-000005.tar.partial").write_bytes(b"half a shard")
    before = (out / "train" / "shard-000000.tar").stat().st_mtime_ns
    r = moco_shard(shards.parent / "src", out, "--shard-size", 16, "--quiet")
    assert r.returncode == 0, r.stderr
    assert (out / "train" / "shard-000000.tar").stat().st_mtime_ns == before  # not written again
    for name in ("train/shard-000007.tar", "train/shard-000005.tar"):
        assert (out / name).read_bytes() == (shards / name).read_bytes()
    assert json.loads((out / MANIFEST).read_text()) == json.loads((shards / MANIFEST).read_text())
    other = image_tree(tmp_path / "other", per_class=(2, 1))
    r = moco_shard(other, out, "--quiet")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"{out} was written from" in r.stderr and "choose another output folder" in r.stderr


def test_training_batches_do_not_depend_on_the_loader_processes(shards, tmp_path):
    def batches(workers):
        loaders = build_loaders(config(tmp_path, shards, f"data.num_workers={workers}", "data.pipeline=cpu"),
                                torch.device("cpu"))
        loaders.sampler.set_epoch(1)
        out = [(x_q.clone(), x_k.clone(), idx.clone()) for (x_q, x_k), _, idx in loaders.train]
        loaders.close()
        return out

    zero, two = batches(0), batches(2)
    assert len(zero) == len(two) == 7
    for a, b in zip(zero, two):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_shards_run_stopped_mid_epoch_resumes_bit_identical_with_stable_indices(shards, tmp_path):
    extra = ("data.pipeline=cpu", "negatives.kind=memory_bank", "memory_bank.init=encode")  # 2 epochs of 3 steps
    straight = Trainer(config(tmp_path / "a", shards, *extra))
    final = straight.fit()
    assert final["knn_top1"] > 0 and straight.loaders.num_items == 120 and straight.loaders.num_test == 24
    stopped = Trainer(config(tmp_path / "b", shards, *extra))
    stopped.prepare_run_dir()
    stopped.train_epoch()
    stopped.signals.signum = 15
    stopped.train_epoch()  # stops after its first step: mid-epoch
    assert stopped.step_in_epoch == 1
    stopped.save()
    del stopped
    resumed = Trainer(config(tmp_path / "b", shards, *extra, "train.resume=auto"))
    assert resumed.fit() == final
    for a, b in zip(straight.encoder_q.state_dict().values(), resumed.encoder_q.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(straight.negatives.bank, resumed.negatives.bank)


def damaged(shards, tmp_path):
    copy = tmp_path / "copy"
    tmp_path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-r", str(shards), str(copy)], check=True)
    return copy


def test_a_truncated_or_missing_shard_is_one_line(shards, tmp_path):
    copy = damaged(shards, tmp_path)
    path = copy / "train" / "shard-000003.tar"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"shard .*shard-000003.tar has 5000 bytes, the manifest \d+: it was truncated"):
        build_loaders(config(tmp_path, copy), torch.device("cpu"))
    path.unlink()
    with pytest.raises(DataError, match=r"shard .*shard-000003.tar is missing"):
        build_loaders(config(tmp_path, copy), torch.device("cpu"))
    listing = tmp_path / "shards.txt"
    listing.write_text(f"{shards / 'train' / 'shard-000000.tar'}\n\ncopy/train/shard-000003.tar\n")
    with pytest.raises(DataError, match=r"shards.txt, line 3: shard .*shard-000003.tar is missing"):
        build_loaders(config(tmp_path, listing, "data.test_split=''"), torch.device("cpu"))


def test_a_txt_of_shards_reads_them_with_their_classes(shards, tmp_path):
    listing = tmp_path / "shards.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted((shards / "train").glob("*.tar"))))
    loaders = build_loaders(config(tmp_path, listing), torch.device("cpu"))
    assert loaders.num_items == 120 and loaders.test is None and loaders.num_classes == 3


def test_rewritten_shards_are_refused_on_resume_naming_the_shard(shards, tmp_path):
    copy = damaged(shards, tmp_path)
    Trainer(config(tmp_path, copy, "train.epochs=1", "eval.knn_every=0")).fit()
    write_shards(shards.parent / "src", tmp_path / "again", shard_size=8, progress=False)
    for split in ("train", "test"):  # the same images, cut into shards of 8: other files
        subprocess.run(["rm", "-rf", str(copy / split)], check=True)
        subprocess.run(["cp", "-r", str(tmp_path / "again" / split), str(copy / split)], check=True)
    (copy / MANIFEST).write_text((tmp_path / "again" / MANIFEST).read_text())
    resumed = Trainer(config(tmp_path, copy, "train.epochs=2", "train.resume=auto"))
    with pytest.raises(CheckpointError, match=r"was trained on other shards: .*shard-000000.tar has changed since"):
        resumed.prepare_run_dir()


def reordered(path):
    """Rewrite a shard in place with its samples in reverse order: the same members, so the same
    size, and another image at each of its places. Returns its new SHA-256."""
    import hashlib

    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    swapped = dict(zip(keys, reversed(keys)))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in sorted(members, key=lambda md: (swapped[md[0].name.split(".")[0]], md[0].name)):
            m.name = swapped[m.name.split(".")[0]] + "." + m.name.split(".", 1)[1]
            tar.addfile(m, io.BytesIO(data))
    size = path.stat().st_size
    path.write_bytes(out.getvalue().ljust(size, b"\0"))
    assert path.stat().st_size == size
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_shard_rewritten_at_the_same_size_is_refused_on_resume_by_its_sha256(shards, tmp_path):
    """Issue 41: a checkpoint knows a moco-shard folder's shards by the manifest's SHA-256, not by
    their names and sizes alone: a shard whose samples moved (same size) is refused when the
    manifest records it, as moco-shard does for every shard it writes."""
    copy = damaged(shards, tmp_path)
    Trainer(config(tmp_path, copy, "train.epochs=1", "eval.knn_every=0")).fit()
    digest = reordered(copy / "train" / "shard-000001.tar")
    manifest = json.loads((copy / MANIFEST).read_text())
    old = manifest["splits"]["train"]["shards"][1]["sha256"]
    assert digest != old
    manifest["splits"]["train"]["shards"][1]["sha256"] = digest
    (copy / MANIFEST).write_text(json.dumps(manifest))
    resumed = Trainer(config(tmp_path, copy, "train.epochs=2", "train.resume=auto"))
    with pytest.raises(CheckpointError, match=rf"shard-000001.tar has changed since \(items 16 -> 16, {old[:12]} -> {digest[:12]}\)"):
        resumed.prepare_run_dir()


def corrupt_copy(shards, tmp_path, bad_items):
    """A copy whose shard 0 has ``bad_items`` images replaced by bytes that are not a JPEG."""
    copy = damaged(shards, tmp_path)
    path = copy / "train" / "shard-000000.tar"
    members = []
    with tarfile.open(path) as tar:
        for m in tar:
            data = tar.extractfile(m).read()
            if m.name.endswith(".jpg") and int(m.name[:9]) in bad_items:
                data = (b"\xff\xd8 not a jpeg " + data)[: len(data)]  # same length: the manifest's size still holds
            members.append((m, data))
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
    return copy


def test_a_corrupt_jpeg_is_skipped_and_counted_and_too_many_stop_the_run(shards, tmp_path, capfd):
    copy = corrupt_copy(shards, tmp_path, {3})
    cfg = config(tmp_path, copy, "data.on_bad_image=skip", "data.num_workers=0", "train.epochs=1", "eval.knn_every=0")
    Trainer(cfg).fit()
    err = capfd.readouterr().err
    assert err.count("warning: skipping unreadable image item 3 of ") == 1
    copy = corrupt_copy(shards, tmp_path / "many", set(range(16)))
    cfg = config(tmp_path / "many", copy, "data.on_bad_image=skip", "data.num_workers=0", "train.epochs=1")
    with pytest.raises(DataError, match=r"unreadable images among \d+ read, more than data.max_bad_images = 0.01"):
        Trainer(cfg).fit()
    with pytest.raises(DataError, match=r"cannot read image item \d+ of .*shard-000000.tar: .*data.on_bad_image=skip"):
        Trainer(config(tmp_path / "fail", copy, "data.num_workers=0", "train.epochs=1")).fit()


# ------------------------------------------------------------------- data.decode=gpu (run here on the CPU)
def test_the_gathered_crops_of_one_size_are_the_batched_views():
    """Per-image sizes draw the very parameters one size draws, and the gathered crops with the
    colour operations after them are random_views' to float rounding."""
    from moco_engine.data.images.augment import (
        draw_params,
        finish_views,
        ragged_crops,
        random_views,
    )
    from moco_engine.data.images.recipes import view_specs

    spec = view_specs("moco_v2", 24, 0.0)[0]
    images = torch.randint(0, 256, (6, 3, 40, 56), dtype=torch.uint8)
    batched = random_views(images, spec, torch.Generator().manual_seed(5))
    sizes = torch.tensor([[40.0, 56.0]] * 6)
    p = draw_params(6, sizes[:, 0], sizes[:, 1], spec, torch.Generator().manual_seed(5))
    gathered = finish_views(ragged_crops(list(images), sizes, p.boxes, p.flip, spec.size), p, spec)
    assert torch.allclose(batched, gathered, atol=1e-4)


def test_ragged_views_crop_each_image_within_its_own_size():
    """On images of several sizes, each view is the crop of its own image: the canvas repeats an
    image's last row and column, which is what border padding reads beyond it."""
    import torch.nn.functional as F

    from moco_engine.data.images.augment import crop_flip_grid, draw_params, ragged_views
    from moco_engine.data.images.recipes import view_specs

    spec = view_specs("moco_v2", 16, 0.0)[0]
    spec = dataclasses.replace(spec, jitter_p=0.0, gray_p=0.0, blur_p=0.0)  # the crop alone
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((20, 30), (41, 17), (25, 25), (9, 60))]
    views = ragged_views(images, spec, torch.Generator().manual_seed(3))
    sizes = torch.tensor([x.shape[1:] for x in images], dtype=torch.float32)
    p = draw_params(4, sizes[:, 0], sizes[:, 1], spec, torch.Generator().manual_seed(3))
    for i, x in enumerate(images):
        grid = crop_flip_grid(p.boxes[i : i + 1], p.flip[i : i + 1], x.shape[1], x.shape[2], spec.size)
        alone = F.grid_sample(x[None].float() / 255, grid, mode="bilinear", padding_mode="border", align_corners=False)
        mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
        assert torch.allclose(views[i : i + 1], (alone - mean) / std, atol=1e-4), i


@pytest.fixture(scope="module")
def large_shards(tmp_path_factory):
    """Shards of JPEGs of several sizes above the crop (as full-size photographs are)."""
    base = tmp_path_factory.mktemp("large")
    write_shards(image_tree(base / "src", per_class=(24, 4), sizes=[(96, 64), (64, 80), (120, 90)]), base / "out",
                 shard_size=10, progress=False)
    return base / "out"


def test_the_two_decoders_give_the_same_pixels_up_to_rounding(large_shards):
    from torchvision.io import decode_jpeg

    from moco_engine.data.shards.reader import manifest_split, read_manifest

    cfg = load_config([], ["data.name=shards", f"data.root={large_shards}"]).data
    items = manifest_split(large_shards, read_manifest(large_shards), "train", cfg)
    worst = 0
    for i in range(len(items)):
        pil = torch.from_numpy(np.asarray(items.load(i))).permute(2, 0, 1)
        tv = decode_jpeg(items.load_encoded(i))
        assert pil.shape == tv.shape
        worst = max(worst, int((pil.int() - tv.int()).abs().max()))
    assert worst <= 1  # both libjpeg-turbo on a CPU (BENCHMARKS.md has the measured figure; nvJPEG's pending)


def test_decode_gpu_trains_on_ragged_images_and_resumes_bit_identical(large_shards, tmp_path):
    extra = ("data.decode=gpu", "data.augmentation=moco_v2", "data.image_size=32", "optim.batch_size=8",
             "data.num_workers=2", "track.preview=4")  # 2 epochs of 3 steps of 8 images of three sizes
    straight = Trainer(config(tmp_path / "a", large_shards, *extra))
    final = straight.fit()
    assert straight.loaders.steps_per_epoch == 3 and final["steps"] == 6
    assert (tmp_path / "a" / "run" / "augmentations.png").is_file()
    stopped = Trainer(config(tmp_path / "b", large_shards, *extra))
    stopped.prepare_run_dir()
    stopped.train_epoch()
    stopped.signals.signum = 15
    stopped.train_epoch()
    assert (stopped.step, stopped.step_in_epoch) == (4, 1)
    stopped.save()
    del stopped
    resumed = Trainer(config(tmp_path / "b", large_shards, *extra, "train.resume=auto"))
    assert resumed.fit() == final
    for a, b in zip(straight.encoder_q.state_dict().values(), resumed.encoder_q.state_dict().values()):
        assert torch.equal(a, b)


def test_decode_gpu_needs_a_source_of_encoded_images(tmp_path):
    from moco_engine.config.schema import UserError

    cfg = load_config([], [*TINY, "data.decode=gpu", f"train.out_dir={tmp_path}"])
    with pytest.raises(UserError, match="'data.decode' = 'gpu'.*data.name=synthetic does not"):
        build_loaders(cfg, torch.device("cpu"))


REAL = ROOT / ".data" / "imagenet-sample-shards"  # tools/make_imagenet_sample.py, then moco-shard (never committed)


@pytest.mark.skipif(not (REAL / MANIFEST).is_file(), reason="no full-size JPEG shards in .data/ (README: shards)")
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_real_full_size_jpegs_train_through_both_decoders(tmp_path, decode):
    """ImageNet's own JPEGs (about 500 x 375 px, one a class) through MoCo v2's 224 px recipe."""
    cfg = load_config([], [*TINY, "data.name=shards", f"data.root={REAL}", "data.test_split=''", f"data.decode={decode}",
                           "data.augmentation=moco_v2", "data.image_size=224", "optim.batch_size=8", "train.epochs=1",
                           "train.steps_per_epoch=2", "data.num_workers=2", f"train.out_dir={tmp_path}"])
    trainer = Trainer(cfg)
    assert trainer.loaders.num_items == len(json.loads((REAL / MANIFEST).read_text())["classes"])
    assert trainer.fit()["steps"] == 2


def test_a_txt_of_urls_fetches_each_shard_once_into_the_cache(shards, tmp_path, monkeypatch):
    """URLs through wids' downloader (file:// here: nothing leaves the machine), cached under their
    whole URL, so train/ and test/ shards of one name stay apart."""
    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "cache"))
    listing = tmp_path / "urls.txt"
    urls = [f"file://{p}" for p in (shards / "train" / "shard-000000.tar", shards / "test" / "shard-000000.tar")]
    listing.write_text("\n".join(urls) + "\n")
    loaders = build_loaders(config(tmp_path, listing, "data.test_split=''", "data.num_workers=0"), torch.device("cpu"))
    assert loaders.num_items == 32 and len(list((tmp_path / "cache").iterdir())) == 2
    x, targets, _ = next(iter(loaders.plain_train))
    assert x.shape == (32, 3, 32, 32) and targets.tolist() == [0] * 16 + [0] * 8 + [1] * 8  # train's cats, test's cats, dogs
