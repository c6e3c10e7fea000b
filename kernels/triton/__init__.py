"""The Triton launchers, one module per op (imported lazily by kernels.ops, only when a Triton
implementation is requested, so `kernels` imports where Triton is not installed):

    common.py     shared launcher helpers and the head_matvec device function
    forward.py    head_forward_triton            sgd.py        sgd_step_triton
    delta.py      delta_step_triton              prototype.py  prototype_step_triton
    rls.py        rls_step_triton                support.py    support_step_triton
    entropy.py    entropy_step_triton

Every launcher takes the op's tensors as kernels.ops checked and normalised them (per-slot
hyper-parameters as float32 [S]) and, where it sorts rows by slot, an optional `batch`
(kernels.SlotBatch; built when omitted). The modules import the real `triton` package
(absolute imports: this package's name does not shadow it).
"""
