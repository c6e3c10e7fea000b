"""fwserve head ops: many sessions' classifier heads read and written in one launch.

    from kernels import head_forward, sgd_step, delta_step, prototype_step, rls_step
    from kernels import support_step, entropy_step   # label-free rules (T3A supports, TENT)
    from kernels import reference   # float64 definitions of every op

Triton kernels run for CUDA tensors, batched torch for CPU tensors (see kernels.ops).
"""

from . import reference
from .ops import delta_step, entropy_step, head_forward, prototype_step, rls_step, sgd_step, support_step

__all__ = ["head_forward", "sgd_step", "delta_step", "prototype_step", "rls_step", "support_step", "entropy_step",
           "reference"]
