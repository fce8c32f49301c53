"""Opening a checkpoint's query encoder, for ``moco-eval`` and ``moco-export`` (``tools/cli.py``)
and from Python::

    cfg, encoder, path = open_checkpoint("runs/cifar10_demo")     # the run's latest checkpoint
    torch.save(torchvision_state_dict(encoder), "r18.pth")        # evaluation/export.py

f_q is what the run's method builds (its ``MethodEntry.encoder``): an ``Encoder`` (backbone and
head), or for ``method=itc`` the two towers (``itc.TwoTowers``: ``.image``, ``.text``, ``.temp``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from moco_engine.config.loading import load_config
from moco_engine.config.registry import registry
from moco_engine.config.schema import Config, UserError
from moco_engine.method.encoders import build_encoder
from moco_engine.run import checkpoint as ckpt


def build_query_encoder(cfg: Config, input_shape: Any) -> nn.Module:
    """f_q as ``build_parts`` builds it for ``cfg.method``: the method's own (``MethodEntry.encoder``:
    itc's two towers) or ``model``'s :class:`~moco_engine.method.encoders.Encoder`."""
    entry = registry("method")[cfg.method]
    return entry.encoder(cfg, input_shape) if entry.encoder is not None else build_encoder(cfg.model, input_shape)


def open_checkpoint(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                    yaml_files: list[str] | tuple[str, ...] = ()) -> tuple[Config, nn.Module, Path]:
    """The query encoder f_q of a checkpoint (a file, or a run folder: its latest checkpoint):
    :func:`open_checkpoint_state` without the checkpoint's state."""
    cfg, encoder, path, _ = open_checkpoint_state(path, overrides, yaml_files)
    return cfg, encoder, path


def open_checkpoint_state(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                          yaml_files: list[str] | tuple[str, ...] = ()) -> tuple[Config, nn.Module, Path, dict[str, Any]]:
    """The config, the query encoder f_q (:func:`build_query_encoder`, its weights loaded), the
    checkpoint's path and its whole state (``input_shape``, the data source's state, the other models,
    ...) of a checkpoint (a file, or a run folder: its latest checkpoint), read once.

    The config is the one saved in the checkpoint with ``yaml_files`` (e.g. a probe protocol,
    ``configs/linear/moco_v3_vit.yaml``) and then ``overrides`` on top (e.g. ``data.root`` where
    the data lives on this machine, ``eval.knn_k``, ``linear.epochs``).

    Raises:
        CheckpointError: no readable checkpoint there.
        UserError: an override changes the model so the weights no longer fit.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        found = ckpt.latest_checkpoint(path)
        if found is None:
            raise ckpt.CheckpointError(f"no checkpoint in {path / ckpt.CHECKPOINT_DIR}")
        path, state = found
    else:
        state = ckpt.load_checkpoint(path)
    cfg = load_config(list(yaml_files), list(overrides), base=state["config"])
    # The shape of one input, as the run saved it (checkpoints before it held images only).
    size = cfg.data.image_size
    encoder = build_query_encoder(cfg, state.get("input_shape", (3, size, size)))
    try:
        encoder.load_state_dict(state["encoder_q"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"checkpoint {path} does not fit the model these overrides describe: {first}") from None
    return cfg, encoder, path, state
