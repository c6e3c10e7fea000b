"""Shim: the GPU acceptance check lives in loadtests/gpu_check.py (`python -m loadtests.gpu_check`).
`python -m kernels.gpu_check [--json PATH] [--skip-tests]` keeps working and forwards there."""

import sys

from loadtests.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
