"""Shim: the head-op benchmark lives in loadtests/kernel_bench.py; `python -m kernels.bench
[--quick] ...` keeps working and forwards there."""

if __name__ == "__main__":
    from loadtests.kernel_bench import main

    main()
