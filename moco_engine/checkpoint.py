"""Checkpoints on disk: atomic writes, a ``latest`` pointer, rotation, and loading.

Layout of a run folder's ``checkpoints/``::

    checkpoint_00000391.pt          one file per save, named by the global step
    checkpoint_00000391.pt.sha256   its SHA-256, checked on load
    latest                          the file name of the newest checkpoint (written last)

A save never leaves a half-written file under a checkpoint's name: the bytes go to a temporary
file in the same folder, are fsynced, and ``os.replace`` renames them in one step. The hash is
written before the checkpoint is renamed into place, the ``latest`` pointer after it, and old
files are pruned last, so a crash at any moment leaves the previous checkpoint intact, and a
checkpoint damaged later (truncated, a flipped byte) is caught by its hash.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .config import UserError

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, unreadable, or from an incompatible run)."""


def _atomic_write(path: Path, data: bytes, before_rename: Any = None) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, call ``before_rename()``, and
    rename the temp file to ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def checkpoint_files(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest first (by global step in the name)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    return sorted(folder.glob("checkpoint_*.pt")) if folder.is_dir() else []


def save_checkpoint(state: dict[str, Any], run_dir: Path, step: int, keep: int) -> Path:
    """Write ``state`` as ``checkpoints/checkpoint_<step>.pt``, point ``latest`` at it, and keep
    only the newest ``keep`` files."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"checkpoint_{step:08d}.pt"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest().encode()
    _atomic_write(path, data, before_rename=lambda: _atomic_write(_hash_file(path), digest))
    _atomic_write(folder / LATEST, path.name.encode())
    for old in checkpoint_files(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
        _hash_file(old).unlink(missing_ok=True)
    return path


def _hash_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read one checkpoint file, checking it against its SHA-256 file when there is one.

    Raises:
        CheckpointError: the file is missing, damaged, truncated or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    hash_file = _hash_file(path)
    if hash_file.is_file() and hashlib.sha256(data).hexdigest() != hash_file.read_text().strip():
        raise CheckpointError(f"checkpoint {path} fails its integrity check (SHA-256 differs from {hash_file.name})")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {first}") from None
    if not isinstance(state, dict) or "config" not in state:
        raise CheckpointError(f"{path} is not a moco_engine checkpoint")
    return state


# Settings listed first when a checkpoint does not fit: those that shape the state's tensors.
SHAPING_GROUPS = ("method", "model.", "negatives.", "queue.", "memory_bank.", "loss.", "data.")


def tensor_shapes(state: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Every tensor in a nested state (dicts of dicts of tensors) by dotted name, with its shape."""
    if isinstance(state, torch.Tensor):
        return {prefix: tuple(state.shape)}
    if isinstance(state, dict):
        out: dict[str, tuple[int, ...]] = {}
        for key, value in state.items():
            out.update(tensor_shapes(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {}


def misfits(saved: dict[str, Any], fresh: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
    """How the tensors of a saved state differ from those of a freshly built run's, section by
    section (``encoder_q``, ``negatives``, ...): names missing on either side, shapes that differ.
    A section the fresh run does not hold (None) is not compared."""
    problems = []
    for section in sections:
        if fresh.get(section) is None:
            continue
        have, want = tensor_shapes(saved.get(section) or {}, section), tensor_shapes(fresh[section], section)
        for name in sorted(have.keys() | want.keys()):
            if name not in have:
                problems.append(f"{name} missing from the checkpoint")
            elif name not in want:
                problems.append(f"{name} not in this config's model")
            elif have[name] != want[name]:
                if name == "negatives.bank":
                    problems.append(f"memory bank of N={have[name][0]} items (checkpoint) vs a data set of N={want[name][0]} items")
                else:
                    problems.append(f"{name} of shape {have[name]} (checkpoint) vs {want[name]} (config)")
    return problems


def differing_settings(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key a (checkpoint) vs b (config)`` for every setting of :data:`SHAPING_GROUPS` whose
    value differs (keys a checkpoint predates are left out)."""
    from .config import valid_keys

    missing = object()

    def get(d: Any, key: str) -> Any:
        for part in key.split("."):
            if not isinstance(d, dict) or part not in d:
                return missing
            d = d[part]
        return d

    out = []
    for key in valid_keys():
        if key.startswith(SHAPING_GROUPS):
            a, b = get(saved, key), get(now, key)
            if a is not missing and a != b:
                out.append(f"{key} {a!r} (checkpoint) vs {b!r} (config)")
    return out


def latest_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint of a run, or None if it has none.

    Tries the file ``latest`` names first, then the others newest first, warning in one line
    about each one that cannot be read.
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    candidates = list(reversed(checkpoint_files(run_dir)))
    pointer = folder / LATEST
    if pointer.is_file():
        named = folder / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    for path in candidates:
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as e:
            warnings.warn(f"{e}; trying an older checkpoint", stacklevel=2)
    return None
