"""Shim: the head-op benchmark lives in loadtests/kernel_bench.py (`python -m loadtests.kernel_bench`).
`python -m kernels.bench [--quick] ...` keeps working and forwards there; OPS, ROWS and run are
re-exported for callers that still import them from here."""

from loadtests.kernel_bench import OPS, ROWS, main, run  # noqa: F401

if __name__ == "__main__":
    main()
