"""fwserve head ops: many sessions' classifier heads read and written in one launch.

    from kernels import head_forward, sgd_step, delta_step, prototype_step, rls_step
    from kernels import support_step, entropy_step   # label-free rules (T3A supports, TENT)
    from kernels import SlotBatch, replay_slots      # per-call row metadata; log replay layout
    from kernels import reference   # float64 definitions of every op
    from kernels import dispatch    # implementation per device, debug index checks
    from kernels import feature_stats_step, standardize_features, standardized_head, affinity_step  # label-free
    from kernels import class_mean_head_step  # heads from class means through a learned metric (hyper)

Every op takes an optional `batch=SlotBatch(slots)`, so ops called on the same rows group them
by slot once. Triton kernels run for CUDA tensors, batched torch for CPU tensors (kernels.ops).
On the torch path an op's values for one slot depend on the call's per-slot row counts (its
profile): the shape -> code path contract that exact log replay relies on is stated in
kernels/slot_batch.py, with replay_slots building a replay call's slot layout.

Modules: ops.py (the public ops), slot_batch.py, torch_ops.py (the torch path), triton/ (the
Triton launchers, imported only when used), dispatch.py, reference.py. The benchmark and the
GPU acceptance check live in loadtests/ (kernel_bench.py, gpu_check.py, aot_check.py).
"""

from . import dispatch, reference
from .ops import delta_step, entropy_step, head_forward, prototype_step, rls_step, sgd_step, support_step
from .slot_batch import SlotBatch, replay_slots
from .class_mean_head import class_mean_head_step  # noqa: E402
from .label_free_ops import affinity_step, feature_stats_step, standardize_features, standardized_head  # noqa: E402

__all__ = ["head_forward", "sgd_step", "delta_step", "prototype_step", "rls_step", "support_step", "entropy_step",
           "class_mean_head_step", "SlotBatch", "replay_slots", "reference", "dispatch",
           # label-free rules on frozen features (kernels/label_free_ops.py)
           "feature_stats_step", "standardize_features", "standardized_head", "affinity_step"]
