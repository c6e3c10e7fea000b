#!/bin/sh
# Install fwserve into the Python environment of $PYTHON: torch first (pinned, the build for
# the image flavour), then the project itself with its dependencies (not editable, so the
# bundled backbone weights are copied into site-packages as package data).
#
# The container build (deploy/docker/Dockerfile) runs exactly this script, and
# tests/deploy/test_install.py runs it in a fresh virtual environment.
#
# Usage: deploy/install.sh [SOURCE_DIR]        (default: the repository root above this script)
# Environment:
#   PYTHON            interpreter of the target environment (default: python3)
#   FWSERVE_FLAVOR    cpu | cuda (default: cpu)
#   TORCH_VERSION     torch release (default: 2.13.0, the Makefile's pin)
#   TORCH_INDEX_URL   index for the torch wheel; default: the PyTorch CPU index for cpu, pip's
#                     configured index (PyPI: CUDA build on Linux) for cuda; "-" = pip's configured
#                     index for either flavour (e.g. a local wheel through PIP_FIND_LINKS)
#   FWSERVE_EXTRAS    extras of the project to install (default: redis,grpc: the client of the
#                     shared session store, and the gRPC server of --grpc-port; "" for none)
#   REQUIRE_BUNDLED_WEIGHTS  1 = fail unless the bundled backbone weights were installed
set -eu

PYTHON=${PYTHON:-python3}
FLAVOR=${FWSERVE_FLAVOR:-cpu}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
SRC=${1:-$(cd "$(dirname "$0")/.." && pwd)}

case "$FLAVOR" in
  cpu)  default_index=https://download.pytorch.org/whl/cpu ;;
  cuda) default_index=- ;;
  *)    echo "install.sh: FWSERVE_FLAVOR must be cpu or cuda, got '$FLAVOR'" >&2; exit 2 ;;
esac
TORCH_INDEX_URL=${TORCH_INDEX_URL:-$default_index}
EXTRAS=${FWSERVE_EXTRAS-redis,grpc}

set -x
if [ "$TORCH_INDEX_URL" = "-" ]; then
  "$PYTHON" -m pip install "torch==$TORCH_VERSION"
else
  "$PYTHON" -m pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
fi
# torch is already satisfied, so the project's own requirement on it pulls no other build.
"$PYTHON" -m pip install "$SRC${EXTRAS:+[$EXTRAS]}"
set +x

# Post-install check: the entry point imports, and the bundled backbone is where it is loaded from.
"$PYTHON" - "$FLAVOR" "${REQUIRE_BUNDLED_WEIGHTS:-0}" <<'PY'
import sys

import torch

import server.cli  # noqa: F401  (the entry point's module imports)
from models import bundled_weights
from models.backbone import DEFAULT_BACKBONE

flavor, require = sys.argv[1], sys.argv[2] == "1"
w = bundled_weights(DEFAULT_BACKBONE)
print(f"fwserve install: torch {torch.__version__} (cuda build: {torch.version.cuda or 'no'}), "
      f"bundled {DEFAULT_BACKBONE}: {w or 'missing'}")
if flavor == "cuda" and not torch.version.cuda:
    sys.exit("install.sh: the cuda flavour got a torch build without CUDA")
if require and w is None:
    sys.exit(f"install.sh: bundled weights of {DEFAULT_BACKBONE} are missing (train them with "
             "`fwserve train-backbone` and commit models/weights/, or build with REQUIRE_BUNDLED_WEIGHTS=0)")
PY
