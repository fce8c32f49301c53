"""The package's layers, read from its source: imports run downward only, the public face
resolves, and no module reaches into another's underscore names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import moco_engine

PACKAGE = Path(moco_engine.__file__).parent
#: Lowest first: a module may import its own layer and those before it.
LAYERS = ("config", "runtime", "method", "data", "evaluation", "run", "tools")


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int | None:
    """The layer of ``moco_engine.<layer>...``; None for the face (the package's top level)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import of the package in a file, inner imports included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: a relative import (the layers read best absolute)"
            if node.module and node.module.split(".")[0] == "moco_engine":
                found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "moco_engine"]
    return found


def test_every_module_sits_in_a_layer():
    loose = [m for m in modules() if layer(m) is None and m not in ("moco_engine.__init__", "moco_engine.__main__")]
    assert not loose, f"modules outside the layers: {loose}"
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} - {"assets"} == set(LAYERS)


def test_imports_run_downward_only():
    upward = []
    for module, path in modules().items():
        own = layer(module)
        for line, target, names in imports(path):
            # "from moco_engine.run import folder": the imported names may be modules of that layer
            targets = [f"{target}.{n}" if f"{target}.{n}" in modules() else target for n in names] or [target]
            for t in targets:
                if own is not None and layer(t) is not None and layer(t) > own:
                    upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {LAYERS[own]} imports {t}")
    assert not upward, "\n".join(upward)


def test_no_module_imports_another_modules_underscore_names():
    reached = [f"{path.relative_to(PACKAGE.parent)}:{line}: {target}.{n}"
               for module, path in modules().items() for line, target, names in imports(path)
               for n in names if n.startswith("_") and n != "__version__"]
    assert not reached, "\n".join(reached)


#: Modules of one modality: the run layer reaches them only through modality-neutral ones
#: (the data source's declarations and state, the evaluation layer's monitor).
MODALITY_MODULES = ("moco_engine.data.text", "moco_engine.data.images", "moco_engine.data.shards", "moco_engine.data.pairs",
                    "moco_engine.method.text_encoder", "moco_engine.method.vit", "moco_engine.method.timm_backbones",
                    "moco_engine.evaluation.retrieval", "moco_engine.evaluation.text_eval",
                    "moco_engine.evaluation.export_text")


def test_the_run_layer_imports_nothing_of_one_modality():
    """Issue 35: the loop, checkpoints and resume never name a modality; a text run's tokenizer
    is its source's state (data/sources.py), kept through the source's protocol."""
    found = []
    for module, path in modules().items():
        if module.startswith("moco_engine.run."):
            for line, target, names in imports(path):
                for t in [f"{target}.{n}" for n in names if f"{target}.{n}" in modules()] or [target]:
                    if t.startswith(MODALITY_MODULES):
                        found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {t}")
            if "tokeniz" in path.read_text().lower():
                found.append(f"{path.relative_to(PACKAGE.parent)}: names a tokenizer")
    assert not found, "\n".join(found)


#: What a module that knows no modality never writes (Issue 41): a modality's attributes and
#: classes, a comparison of data.name with one, and a loader, its items or its source probed for
#: what it is.
MODALITY_BRANCHES = (r"loaders\.text\b", r"splits\.text\b", r"\bChunkPlain\b", r"\bload_encoded\b",
                     r"data\.name\s*[!=]=", r"\b(hasattr|isinstance)\([^,]*(loader|train|split|source|items)")


def test_build_loaders_and_the_run_layer_branch_on_no_modality():
    """The data source is one protocol: build_loaders dispatches through SOURCES alone and the
    run asks the source's declarations (images, monitor), never which modality it has."""
    import re

    neutral = [PACKAGE / "data" / "loaders.py", *sorted((PACKAGE / "run").glob("*.py"))]
    found = [f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
             for path in neutral for n, line in enumerate(path.read_text().splitlines(), 1)
             for pattern in MODALITY_BRANCHES if re.search(pattern, line.split("#")[0])]
    assert not found, "\n".join(found)
    assert re.search(MODALITY_BRANCHES[-1], "if isinstance(loaders.train, DeviceTwoViews):")  # the check is real


def test_the_checker_sees_an_upward_import(tmp_path):
    """The direction check is real: a method module importing the run layer is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from moco_engine.run.trainer import Trainer\n")
    (line, target, names), = imports(bad)
    assert layer("moco_engine.method.step") < layer(target)


@pytest.mark.parametrize("name", sorted(moco_engine.FACE))
def test_the_public_face_resolves(name):
    assert getattr(moco_engine, name) is not None


def test_importing_the_package_and_its_schema_imports_no_torch():
    code = "import sys, moco_engine, moco_engine.config.schema; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
