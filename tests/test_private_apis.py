"""The private torch names the engine relies on, checked where an upgrade would change them.

The checked adapters have tests of their own (dynamo's counters: test_compile.py; the native
group norm: test_encoders.py; wids: test_wids_cache.py; a DataLoader's persistent iterator:
test_data.py). The rest are torch's fused ``_foreach`` ops (the EMA, the state copies), the
``_BatchNorm`` base of split-BN and the dispatch mode ``moco-bench --ops`` counts with: each is
named here once, so an upgrade that renames one fails here with its name, not deep in a run.
"""

from __future__ import annotations

import importlib
import re

import pytest
import torch
from test_layers import PACKAGE

#: Each private name, the module it is read from, and who uses it.
PRIVATE = {
    "torch._foreach_lerp_": "the EMA (method/encoders.py), split-BN's running statistics (method/norms.py)",
    "torch._foreach_copy_": "state copies (run/warmup.py, method/step.py, runtime/distributed.py)",
    "torch._foreach_sub": "the encoders' distance (method/encoders.py)",
    "torch._foreach_norm": "the encoders' distance (method/encoders.py)",
    "torch.nn.modules.batchnorm._BatchNorm": "SplitBatchNorm's base (method/norms.py)",
    "torch.utils._python_dispatch.TorchDispatchMode": "moco-bench --ops (tools/opcount.py)",
}


def resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("dotted", sorted(PRIVATE))
def test_each_private_torch_name_the_engine_uses_still_exists(dotted):
    try:
        resolve(dotted)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"torch {torch.__version__} has no {dotted} ({e}): update {PRIVATE[dotted]}")


def test_batchnorm_base_still_checks_its_input_through_the_method_split_bn_overrides():
    base = resolve("torch.nn.modules.batchnorm._BatchNorm")
    assert callable(getattr(base, "_check_input_dim", None)), (
        "torch's _BatchNorm no longer calls _check_input_dim: SplitBatchNorm (method/norms.py) overrides it")


def test_the_package_reads_no_private_torch_name_this_list_lacks():
    """A new private use is named here (or put behind one of the checked adapters)."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        code = path.read_text()
        found |= {m for m in re.findall(r"torch\._foreach_[a-z_]+", code)}
        found |= {m for m in re.findall(r"torch\.utils\._[a-z_]+\.\w+|torch\.utils\._[a-z_]+", code)}
    listed = {name for name in PRIVATE} | {name.rpartition(".")[0] for name in PRIVATE}
    assert found <= listed, f"private torch names used but not listed here: {sorted(found - listed)}"
