"""Shim: the GPU acceptance run lives in loadtests/gpu_check.py; `python -m kernels.gpu_check
--out DIR [--tiny] [--budget-s S] [--skip STEPS]` keeps working and forwards there."""

if __name__ == "__main__":
    import sys

    from loadtests.gpu_check import main

    sys.exit(main())
