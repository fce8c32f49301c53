"""Where a run computes and at what precision: the device, one autocast rule, peak memory.

The training step, evaluation (the kNN monitor, the memory bank's refresh, ``moco-eval``) and
``moco-bench`` all take their autocast from :func:`autocast`, so an fp32 run is fp32 everywhere
and a bf16 run is bf16 everywhere (logits are formed in float32 regardless: ``losses.py``).
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
from typing import Any

import torch

from moco_engine.config.schema import UserError
from moco_engine.runtime import distributed as dist


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device; under torchrun, ``auto`` and ``cuda`` mean this
    process's GPU, cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"config key 'train.device' = {name!r}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"config key 'train.device' = {name!r}: moco_engine runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"config key 'train.device' = {name!r}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank() if dist.launched_by_torchrun() else torch.cuda.current_device())
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision``, or None for full fp32. ``auto``: bf16 on
    CUDA, fp32 on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The one autocast rule: ``dtype`` on ``device``'s type, or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def memory_format(channels_last: bool) -> torch.memory_format:
    """``train.channels_last`` as the memory format of the encoders and their inputs."""
    return torch.channels_last if channels_last else torch.contiguous_format


def own_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """A side stream of random numbers: what runs inside (evaluation, encoding passes) leaves
    the training's RNG as it found it, so how often it runs never changes the training run."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random states (torch CPU, Python, and ``device``'s CUDA generator)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_state`'s output."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's on a GPU, the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: CUDA's free memory, or the OS's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
