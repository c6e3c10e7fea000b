#!/usr/bin/env bash
# The GPU acceptance run in one command, for a bare GPU machine that has its own Python, torch and
# triton but no package registry (and no FastAPI/uvicorn/pydantic):
#
#   bash loadtests/gpu_acceptance.sh
#
# Before, where a registry is reachable: ../shared/gpu/fetch-wheels.sh .whl (from the repository
# root) fetches the serving packages as wheels into .whl; carry that folder with the tree.
# Here, nothing is installed into the machine's Python: the wheels go into a temporary site
# directory put first on PYTHONPATH, then `python -m loadtests.gpu_check --out $OUT/gpu_check`
# runs (its table is printed and written with its JSON and logs). Never calls make.
#
# Environment: WHEELS (wheel folder, default .whl), OUT (default ./gpu-check-out), PYTHON (default
# python3), SITE (the site directory, default a new temporary one), GPU_CHECK_ARGS (extra arguments
# for gpu_check, e.g. "--budget-s 240"). Exit status: gpu_check's (1 = a correctness failure),
# 3 when the wheels do not install.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
OUT=${OUT:-$PWD/gpu-check-out}
SITE=${SITE:-$(mktemp -d /tmp/fwserve-site.XXXXXX)}
mkdir -p "$OUT/gpu_check"

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "installing the wheels failed"; exit 3; }
else
  echo "no wheels in $WHEELS: using the packages $PY already has"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PY" -c "import fastapi, uvicorn, pydantic, pydantic_settings, httpx" 2>/dev/null \
  || echo "warning: serving packages are missing; the serving step will report an error"
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of words
"$PY" -m loadtests.gpu_check --out "$OUT/gpu_check" ${GPU_CHECK_ARGS:-} 2>&1 | tee "$OUT/gpu_check/run.log"
exit "${PIPESTATUS[0]}"
