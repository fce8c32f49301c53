#!/usr/bin/env bash
# The GPU proof kit (moco_engine/tools/proof.py): tools/gpu_proof.sh quick|demo|cpu OUT_DIR [options]
#   quick  the gpu tests and moco-bench's cases of tools/proof_jobs.yaml (at most 4 minutes on a GPU)
#   demo   the README's CIFAR-10 demo command (200 epochs of the full split), its compiled form, a cached probe (at most 9)
#   cpu    both with tiny cases on a CPU (the test suite runs it)
# Options: --data ARCHIVE (default <checkout>/.data/cifar10.tar.gz), --work DIR, --budget SECONDS, --only JOB,..., --jobs FILE
# On a machine without the package's dependencies, wheels in .whl/ are installed first
# (docs/benchmarking.md, "Proving it on a GPU", says which ones).
# Relative paths (OUT_DIR, --data, --work) are the caller's: the kit runs in the caller's folder.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"  # the checkout: its package, configs/ and .whl/
PY=${PYTHON:-python3}  # the interpreter that has torch (python3 on the GPU machine)
# The wheels in .whl/ (omegaconf's; webdataset's and wids' for shards; transformers' for the text
# cases) where the interpreter lacks them.
if ! "$PY" -c "import omegaconf, transformers, webdataset, wids" 2>/dev/null && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/moco_site "$ROOT"/.whl/*.whl
    export PYTHONPATH="/tmp/moco_site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import omegaconf" 2>/dev/null; then
    echo "error: omegaconf is not installed and $ROOT/.whl/ holds no wheels (docs/benchmarking.md, 'Proving it on a GPU')" >&2
    exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
exec "$PY" -m moco_engine.tools.proof "$@"
