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

Only *verified* checkpoints count: a file whose SHA-256 file exists and matches. Anything else
named like a checkpoint (a stray copy, a damaged file, a foreign file) is never counted by the
rotation, followed by ``latest``, deleted or overwritten; a save whose name such a file holds
goes to ``checkpoint_<step>-1.pt`` instead.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from moco_engine.config.schema import UserError

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
NAME = re.compile(r"^checkpoint_(\d+)(?:-(\d+))?\.pt$")  # step, and a suffix when the name was taken


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, unreadable, or from an incompatible run)."""


def _atomic_write(path: Path, data: bytes, before_rename: Any = None) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, call ``before_rename()``, and
    rename the temp file to ``path``. On any failure the temp file is removed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide checkpoints in a shared run folder
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


def _umask() -> int:
    mask = os.umask(0)  # reading it means setting it: put it straight back
    os.umask(mask)
    return mask


def _order(path: Path) -> tuple[int, int]:
    match = NAME.match(path.name)
    assert match is not None
    return int(match[1]), int(match[2] or 0)


def step_of(path: Path) -> int:
    """The global step a checkpoint's file name carries."""
    return _order(Path(path))[0]


def checkpoint_files(run_dir: Path) -> list[Path]:
    """Every file named like a checkpoint in the run, verified or not, oldest first (by step)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if NAME.match(p.name) and p.is_file()), key=_order)


def _hash_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


# (path, size, mtime) of files whose hash matched: the rotation re-checks a file only when it changed.
_verified_cache: set[tuple[str, int, int]] = set()


def verify(path: Path) -> str | None:
    """Why ``path`` is not a verified checkpoint (no hash file, a hash that differs), or None."""
    hash_file = _hash_file(path)
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key in _verified_cache:
            return None
        if not hash_file.is_file():
            return f"it has no {hash_file.name}"
        if _digest(path.read_bytes()) != hash_file.read_text().strip():
            return f"its SHA-256 differs from {hash_file.name}"
    except OSError as e:
        return f"it cannot be read ({e.strerror})"
    _verified_cache.add(key)
    return None


def verified_files(run_dir: Path) -> list[Path]:
    """The run's verified checkpoints, oldest first."""
    return [p for p in checkpoint_files(run_dir) if verify(p) is None]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def nonfinite_tensors(state: Any, prefix: str = "", allow_nan: tuple[str, ...] = ()) -> list[str]:
    """Dotted names of the floating-point tensors of a nested state that hold NaN or ±inf
    (``allow_nan``: names whose NaN is a sentinel, e.g. an estimate not made yet). One host
    sync per device, however many tensors."""
    named: list[tuple[str, torch.Tensor]] = []

    def walk(value: Any, name: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex():
                named.append((name, value))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{name}.{i}" if name else str(i))

    walk(state, prefix)
    if not named:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    bad = []
    for indices in by_device.values():
        flags = torch.stack([
            (torch.isinf(named[i][1]).any() if named[i][0] in allow_nan else ~torch.isfinite(named[i][1]).all())
            for i in indices
        ]).tolist()
        bad += [named[i][0] for i, f in zip(indices, flags) if f]
    return sorted(bad)


def remove_temporaries(run_dir: Path) -> int:
    """Delete the temporary files of writes that never finished (a process killed mid-save);
    only the live holder of the run's lock may call this. Returns how many it removed."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    stale = list(folder.glob(".*.tmp")) if folder.is_dir() else []  # _atomic_write's names
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def _free_name(folder: Path, step: int) -> Path:
    """``checkpoint_<step>.pt``, or the first ``-n`` variant that no unverified file holds (a
    verified file of the same step is this run's own and may be replaced)."""
    n = 0
    while True:
        path = folder / (f"checkpoint_{step:08d}.pt" if n == 0 else f"checkpoint_{step:08d}-{n}.pt")
        if not path.exists() or verify(path) is None:
            if n:
                warnings.warn(f"{folder / f'checkpoint_{step:08d}.pt'} is not a verified checkpoint of this run and is "
                              f"left alone; saving as {path.name}", stacklevel=3)
            return path
        n += 1


def save_checkpoint(state: dict[str, Any], run_dir: Path, step: int, keep: int) -> Path:
    """Write ``state`` as ``checkpoints/checkpoint_<step>.pt``, point ``latest`` at it, and
    prune the verified checkpoints of earlier steps down to the newest ``keep`` files.

    Raises:
        CheckpointError: the write failed (disk full, an I/O error, no permission), naming the
            path and the OS's reason; the previous checkpoints are intact and no temporary
            file is left behind.
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    path = folder / f"checkpoint_{step:08d}.pt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = _free_name(folder, step)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        digest = _digest(data)
        hash_file = _hash_file(path)
        try:
            _atomic_write(path, data, before_rename=lambda: _atomic_write(hash_file, digest.encode()))
        except BaseException:
            if not path.exists():
                hash_file.unlink(missing_ok=True)  # the hash of a checkpoint that never arrived
            raise
        st = path.stat()
        _verified_cache.add((str(path), st.st_size, st.st_mtime_ns))
        _atomic_write(folder / LATEST, path.name.encode())
        older = [p for p in verified_files(run_dir) if _order(p) < _order(path)]
        # Files of later steps (a run resumed from an earlier checkpoint) are not "old": kept.
        for old in older[: max(len(older) - (keep - 1), 0)]:
            old.unlink(missing_ok=True)
            _hash_file(old).unlink(missing_ok=True)
    except OSError as e:
        reason = e.strerror or str(e)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            reason += " (free space there or set train.out_dir to another disk)"
        raise CheckpointError(f"cannot write checkpoint {e.filename or path}: {reason}; "
                              "the previous checkpoints are intact") from None
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", require_hash: bool = False) -> dict[str, Any]:
    """Read one checkpoint file, checking it against its SHA-256 file when there is one (and
    refusing it without one when ``require_hash``).

    Raises:
        CheckpointError: the file is missing, damaged, truncated, not a checkpoint, or holds
            pickled Python objects (refused unrun: only tensors and plain containers load).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e.strerror}") from None
    hash_file = _hash_file(path)
    if hash_file.is_file() and _digest(data) != hash_file.read_text().strip():
        raise CheckpointError(f"checkpoint {path} fails its integrity check (SHA-256 differs from {hash_file.name})")
    if require_hash and not hash_file.is_file():
        raise CheckpointError(f"{path} has no {hash_file.name}: not a checkpoint this run verified")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise CheckpointError(f"{path} holds pickled Python objects, not only tensors: refused without running "
                                  "them (only weights-only checkpoints load)") from None
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {_first_line(e)}") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {_first_line(e)}") from None
    if not isinstance(state, dict) or "config" not in state:
        raise CheckpointError(f"{path} is not a moco_engine checkpoint")
    return state


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


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


def differing_settings(saved: dict[str, Any], now: dict[str, Any], keys: tuple[str, ...] | None = None) -> list[str]:
    """``key a (checkpoint) vs b (config)`` for every setting of ``keys`` (default: those of
    :data:`SHAPING_GROUPS`) whose value differs (keys a checkpoint predates are left out)."""
    from moco_engine.config.loading import differing_values
    from moco_engine.config.schema import valid_keys

    return differing_values(saved, now, keys if keys is not None else
                            [k for k in valid_keys() if k.startswith(SHAPING_GROUPS)])


def latest_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu",
                      accept: Any = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest usable checkpoint of a run, or None if the run has no file named like one.

    Tries the file ``latest`` names first, then the others newest first; a file counts when it
    has its hash file, matches it, loads, and passes ``accept(state)`` (a reason to refuse it,
    or None). Each one passed over gets a one-line warning.

    Raises:
        CheckpointError: there are files named like checkpoints but none is usable (each named
            with its reason): a resume never silently starts over.
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    candidates = list(reversed(checkpoint_files(run_dir)))
    pointer = folder / LATEST
    if pointer.is_file():
        named = folder / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    refused = []
    for path in candidates:
        try:
            state = load_checkpoint(path, map_location, require_hash=True)
            reason = accept(state) if accept is not None else None
            if reason is None:
                return path, state
            refused.append(f"{path.name} {reason}")
        except CheckpointError as e:
            refused.append(str(e))
        warnings.warn(f"{refused[-1]}; trying an older checkpoint", stacklevel=2)
    if refused:
        raise CheckpointError(f"no usable checkpoint in {folder}: {'; '.join(refused)}. Move these files away "
                              "(or start over with train.resume='' train.overwrite=true, which deletes them)")
    return None
