"""Shim: the GPU acceptance check lives in loadtests/gpu_check.py; `python -m kernels.gpu_check
[--json PATH] [--skip-tests]` keeps working and forwards there."""

if __name__ == "__main__":
    import sys

    from loadtests.gpu_check import main

    sys.exit(main())
