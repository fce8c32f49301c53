"""Starting a backbone from weights on disk (``model.init_from``): a state dict a user names, in
the layouts pretrained weights come in. Nothing is ever downloaded.

Accepted files: a ``.pth``/``.pt``/``.pth.tar`` of tensors (read with ``weights_only``) or a
``.safetensors`` file, holding the state dict itself or under ``state_dict`` / ``model`` (moco,
moco-v3, timm, torchvision and this engine's exports all fit) or ``encoder_q`` (this engine's
checkpoints; a run folder is resolved to its newest verified checkpoint by the run layer,
``run/opening.py``, which hands the loaded file in). Keys are matched after removing the prefix of a MoCo checkpoint (``module.encoder_q.``, ``module.base_encoder.``),
of image–text contrast's image tower (``image.backbone.``) or of a wrapper
(``module.``, ``backbone.``); a MoCo checkpoint's key encoder, predictor and queue are left out,
and so is a classifier the backbone lacks (``fc``, ``head``, ``classifier``). Every tensor of the
backbone must be found with its shape; anything else is one line naming the key.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moco_engine.config.schema import ConfigError

# Prefixes of the backbone inside the checkpoints users bring, most specific first: MoCo v1/v2's
# encoder_q (facebookresearch/moco), MoCo v3's base_encoder (facebookresearch/moco-v3), DDP's,
# method=itc's image tower (its two towers' encoder_q section), and this engine's Encoder (a
# checkpoint's encoder_q section).
PREFIXES = ("module.encoder_q.", "module.base_encoder.", "module.", "image.backbone.", "backbone.")
CLASSIFIERS = ("fc.", "head.", "classifier.")


def read_state_dict(path: Path, loaded: Any = None) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` (unwrapped from ``state_dict`` / ``model`` / ``encoder_q``);
    ``loaded``: its contents, when the caller has read it already."""
    if loaded is None and path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if loaded is None:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "encoder_q"):  # encoder_q: a checkpoint of this engine
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConfigError(f"config key 'model.init_from' = '{path}': not a state dict of tensors")
    return loaded


def backbone_tensors(found: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """``found``'s tensors under the backbone's own names: the first prefix that names any of
    ``wanted`` is removed (none when the keys are the backbone's already)."""
    if wanted & found.keys():
        return found
    for prefix in PREFIXES:
        renamed = {k[len(prefix):]: v for k, v in found.items() if k.startswith(prefix)}
        if wanted & renamed.keys():
            return renamed
    return {}


def init_backbone(backbone: nn.Module, path_text: str, loaded: dict[str, Any] | None = None) -> str:
    """Load the weights of ``path_text`` into ``backbone`` (strictly, classifiers aside);
    ``loaded``: the file's contents when the caller has read them (a run folder's checkpoint).

    Returns:
        one line saying what was loaded, for the console.

    Raises:
        ConfigError: no such file, not a state dict, a tensor of the backbone missing from the
            file or of another shape.
    """
    path = Path(path_text).expanduser()
    if loaded is None and not path.is_file():
        raise ConfigError(f"config key 'model.init_from' = '{path_text}': no such file or run folder")
    try:
        found = read_state_dict(path, loaded)
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as e:  # not torch's, truncated, pickled code
        raise ConfigError(f"config key 'model.init_from' = '{path_text}': "
                          f"cannot read it ({str(e).splitlines()[0][:200]})") from None
    own = backbone.state_dict()
    tensors = backbone_tensors(found, set(own))
    for name, t in own.items():
        if name in tensors and tensors[name].shape != t.shape:
            raise ConfigError(f"config key 'model.init_from' = '{path_text}': {name} has shape "
                              f"{list(tensors[name].shape)} there and {list(t.shape)} in the backbone")
    missing = [k for k in own if k not in tensors and not k.endswith("num_batches_tracked")]
    if missing:
        raise ConfigError(f"config key 'model.init_from' = '{path_text}': the backbone's {missing[0]} is not in it "
                          f"({len(missing)} of {len(own)} tensors missing)")
    extra = [k for k in tensors if k not in own]
    unexpected = [k for k in extra if not k.startswith(CLASSIFIERS)]
    if unexpected:
        raise ConfigError(f"config key 'model.init_from' = '{path_text}': {unexpected[0]} is not a tensor of the "
                          f"backbone ({len(unexpected)} such)")
    backbone.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)
    dropped = f" (left out: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''})" if extra else ""
    return f"model.init_from: the backbone starts from {len(own)} tensors of {path}{dropped}"
