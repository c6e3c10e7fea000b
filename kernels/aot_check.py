"""Shim: the ahead-of-time compile check lives in loadtests/aot_check.py; `python -m
kernels.aot_check [--json FILE] [--quick] ...` keeps working and forwards there."""

if __name__ == "__main__":
    import sys

    from loadtests.aot_check import main

    sys.exit(main())
