"""Test-wide setup.

Triton kernels run under the interpreter on machines without CUDA, so the variable must be
set before anything imports triton.
"""

import os

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
