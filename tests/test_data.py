import io
import tarfile

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

from moco_engine.config.schema import DataConfig
from moco_engine.data.errors import DataError
from moco_engine.data.images.recipes import eval_transform, view_transform
from moco_engine.data.images.sets import read_archive, synthetic_images
from moco_engine.data.sampling import EpochSampler, Indexed, TwoViews
from moco_engine.data.sources import build_splits


def write_image_tree(root, split="train", classes=("a", "b"), per_class=3, size=12):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / split / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_imagefolder_from_a_folder_and_from_an_archive(tmp_path):
    write_image_tree(tmp_path / "data", "train")
    write_image_tree(tmp_path / "data", "test", per_class=2)
    folder = build_splits(DataConfig(name="imagefolder", root=str(tmp_path / "data")))
    assert len(folder.train) == 6 and len(folder.test) == 4 and folder.train.classes == ["a", "b"]
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "data" / "train", arcname="train")
    packed = build_splits(DataConfig(name="imagefolder", root=str(archive), test_split=""))
    assert packed.test is None and packed.train.targets == folder.train.targets
    for i in range(6):  # PNG is lossless: the same pixels either way
        assert np.array_equal(np.asarray(packed.train.load(i)), np.asarray(folder.train.load(i)))


def test_missing_empty_and_imageless_folders_name_the_path(tmp_path):
    with pytest.raises(DataError, match="not found: .*nowhere"):
        build_splits(DataConfig(name="imagefolder", root=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*no 'train' sub-folder"):
        build_splits(DataConfig(name="imagefolder", root=str(tmp_path / "empty")))
    (tmp_path / "text" / "train" / "a").mkdir(parents=True)
    (tmp_path / "text" / "train" / "a" / "notes.txt").write_text("no image here")
    with pytest.raises(DataError, match="no images found in .*text"):
        build_splits(DataConfig(name="imagefolder", root=str(tmp_path / "text")))


def test_a_corrupt_image_in_an_archive_is_named(tmp_path):
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        data = b"not a jpeg"
        info = tarfile.TarInfo("train/a/0.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="train/a/0.jpg"):
        read_archive(archive, "train")


def test_embedded_sample_ships_with_the_package():
    splits = build_splits(DataConfig(name="embedded"))
    assert len(splits.train) == 4000 and len(splits.test) == 1000
    assert len(splits.train.classes) == 10 and splits.train.load(0).size == (32, 32)
    assert np.bincount(splits.train.targets).tolist() == [400] * 10


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-test.tar.xz").exists(), reason="../shared/data not present")
def test_reads_the_shared_cifar10_test_tarball():
    test = read_archive(SHARED_DATA / "cifar10-test.tar.xz", "test")
    assert len(test) == 10_000 and test.images.shape == (10_000, 32, 32, 3)
    assert np.bincount(test.targets).tolist() == [1000] * 10 and test.classes[0] == "airplane"


@pytest.mark.parametrize("preset,size", [("cifar", 32), ("moco_v1", 64), ("moco_v2", 64)])
def test_two_view_presets_give_two_different_normalised_views(preset, size):
    images = synthetic_images(4, 2, 80, seed=0)
    ds = Indexed(images, TwoViews(view_transform(preset, size)))
    (x_q, x_k), target, index = ds[3]
    assert x_q.shape == x_k.shape == (3, size, size)
    assert not torch.equal(x_q, x_k) and index == 3 and target == images.targets[3]
    assert eval_transform(preset, size)(images.load(0)).shape == (3, size, size)


def test_seeded_items_give_the_same_views_every_time_and_new_ones_each_epoch():
    ds = Indexed(synthetic_images(4, 2, 32, seed=0), TwoViews(view_transform("cifar", 32)), seed=7)
    (a_q, a_k), _, _ = ds[(3, 1)]
    torch.rand(5)  # the global RNG state does not matter
    (b_q, b_k), _, i = ds[(3, 1)]
    assert i == 1 and torch.equal(a_q, b_q) and torch.equal(a_k, b_k)
    (c_q, _), _, _ = ds[(4, 1)]
    assert not torch.equal(a_q, c_q)


def test_epoch_sampler_is_seeded_resumable_and_splits_ranks():
    s = EpochSampler(10, seed=3)
    s.set_epoch(2)
    assert {epoch for epoch, _ in s} == {2}
    order = [i for _, i in s]
    assert sorted(order) == list(range(10))
    again = EpochSampler(10, seed=3)
    again.set_epoch(2, skip=4)
    assert [i for _, i in again] == order[4:] and len(again) == 6
    ranks = [EpochSampler(10, seed=3, rank=r, world=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(2)
    assert sorted(i for r in ranks for _, i in r) == list(range(10))
    other = EpochSampler(10, seed=3)
    other.set_epoch(3)
    assert [i for _, i in other] != order


# ============================================================================ data faults
def _image_folder(root, classes_per_split, size=8):
    for split, classes in classes_per_split.items():
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                value = np.full((size, size, 3), 40 * c + i, dtype=np.uint8)
                Image.fromarray(value).save(root / split / name / f"{i}.png")


@pytest.mark.fault("data")
def test_a_corrupt_image_met_by_a_loader_worker_is_the_same_one_line(tmp_path):
    from moco_engine.data.images.sets import FolderImages
    from moco_engine.data.sampling import make_loader

    _image_folder(tmp_path, {"train": ["a", "b"]})
    (tmp_path / "train" / "b" / "1.png").write_bytes(b"\x89PNG broken")
    loader = make_loader(Indexed(FolderImages(tmp_path / "train"), lambda img: 0), batch_size=4, num_workers=1)
    with pytest.raises(DataError) as e:
        list(loader)
    assert str(e.value).startswith("cannot read image ") and "b/1.png" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.fault("data")
@pytest.mark.parametrize("limit", [40, 20])  # a 64-pixel image: PIL warns past its limit, raises past twice it
def test_decompression_bombs_count_as_bad_images(tmp_path, monkeypatch, limit, capsys):
    from moco_engine.data.images.sets import FolderImages

    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "0.png")  # 64 pixels: the "bomb"
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "1.png")  # 16 pixels: fine
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(DataError, match=r"cannot read image .*0\.png"):
        FolderImages(tmp_path).load(0)
    assert FolderImages(tmp_path, on_bad="skip").load(0).size == (4, 4)  # left out, the next one stands in
    assert "skipping unreadable image" in capsys.readouterr().err


@pytest.mark.fault("data")
def test_test_classes_are_matched_to_train_classes_by_name(tmp_path):
    _image_folder(tmp_path, {"train": ["cat", "dog", "frog"], "test": ["cat", "frog"]})
    splits = build_splits(DataConfig(name="imagefolder", root=str(tmp_path)))
    assert splits.test.classes == ["cat", "dog", "frog"] and splits.test.targets == [0, 0, 2, 2]  # frog stays 2
    _image_folder(tmp_path, {"test": ["horse"]})
    with pytest.raises(DataError, match="the test split has class\\(es\\) the train split lacks: horse"):
        build_splits(DataConfig(name="imagefolder", root=str(tmp_path)))


def test_the_auto_pipeline_decodes_into_memory_only_the_data_sets_known_to_fit():
    from moco_engine.data.images.source import resolve_pipeline

    assert DataConfig().pipeline == "auto"
    assert resolve_pipeline(DataConfig(name="embedded")) == "device"  # the default run's
    assert resolve_pipeline(DataConfig(name="cifar10")) == "device"
    assert resolve_pipeline(DataConfig(name="imagefolder")) == "cpu"  # may not fit in memory
    assert resolve_pipeline(DataConfig(name="synthetic")) == "cpu"
    assert resolve_pipeline(DataConfig(name="embedded", pipeline="cpu")) == "cpu"  # asked for: kept


def test_the_attribute_end_workers_reads_is_where_torch_keeps_a_persistent_iterator():
    """sampling.end_workers drops torch's persistent iterator (no public call ends its workers):
    the attribute must still be where it reads it."""
    from torch.utils.data import DataLoader

    from moco_engine.data.sampling import end_workers

    assert "_iterator" in vars(DataLoader(list(range(2)))), (
        "torch's DataLoader no longer keeps its persistent iterator in '_iterator': update sampling.end_workers")
    end_workers([1, 2])  # anything else is left alone


@pytest.mark.slow  # 10 s: a worker process's start-up
def test_end_workers_ends_a_persistent_loaders_workers():
    """Dropping the iterator ends the workers, at once and cleanly."""
    from moco_engine.data.sampling import end_workers, make_loader

    loader = make_loader(list(range(8)), batch_size=4, num_workers=1)
    next(iter(loader))
    workers = loader._iterator._workers
    assert all(w.is_alive() for w in workers)
    end_workers(loader)
    for w in workers:
        w.join(timeout=10)
    assert loader._iterator is None and not any(w.is_alive() for w in workers)
