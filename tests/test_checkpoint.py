import warnings

import pytest
import torch

from moco_engine.run.checkpoint import (
    CheckpointError,
    checkpoint_files,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def state(step):
    return {"config": {}, "step": step, "weights": torch.full((4,), float(step))}


def test_save_keeps_the_newest_k_with_their_hashes_and_points_latest_at_the_newest(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(state(step), tmp_path, step, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint_00000002.pt", "checkpoint_00000002.pt.sha256", "checkpoint_00000003.pt",
                     "checkpoint_00000003.pt.sha256", "latest"]
    path, loaded = latest_checkpoint(tmp_path)
    assert path.name == "checkpoint_00000003.pt" and loaded["step"] == 3


@pytest.mark.fault("rotation")
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_checkpoint_is_reported_and_resume_falls_back_to_the_previous_one(tmp_path, damage):
    save_checkpoint(state(1), tmp_path, 1, keep=3)
    newest = save_checkpoint(state(2), tmp_path, 2, keep=3)
    data = bytearray(newest.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 3]
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="integrity check"):
        load_checkpoint(newest)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, loaded = latest_checkpoint(tmp_path)
    assert loaded["step"] == 1 and path.name == "checkpoint_00000001.pt"
    assert len(caught) == 1 and "checkpoint_00000002.pt" in str(caught[0].message)


@pytest.mark.fault("disk")
def test_an_unfinished_save_leaves_the_previous_checkpoint_untouched(tmp_path, monkeypatch):
    save_checkpoint(state(1), tmp_path, 1, keep=2)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("moco_engine.run.checkpoint.os.replace", crash)
    with pytest.raises(CheckpointError, match="checkpoint_00000002.pt: disk full; the previous checkpoints are intact"):
        save_checkpoint(state(2), tmp_path, 2, keep=2)
    monkeypatch.undo()
    assert [p.name for p in checkpoint_files(tmp_path)] == ["checkpoint_00000001.pt"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert latest_checkpoint(tmp_path)[1]["step"] == 1


def test_checkpoint_files_follow_the_umask(tmp_path):
    import os

    previous = os.umask(0o027)
    try:
        path = save_checkpoint(state(1), tmp_path, 1, keep=2)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640 and (tmp_path / "checkpoints" / "latest").stat().st_mode & 0o777 == 0o640
