"""Fused inference kernels of the ttr layer (Triton) and their plain-PyTorch reference.

`ttr_forward_fused(q, k, v, phi_q, phi_k, ...)` is the entry point the ttr backend calls at
inference; it falls back to `reference.ttr_forward_reference` where Triton or CUDA is missing.
Importing this package does not import triton (that happens on the first fused call).
"""
from .fused import (KernelConfig, fused_unsupported_reasons, kv_state_fused, run_fused_kernels, triton_available,
                    ttr_forward_fused)
from .reference import (PhiWeights, kernel_branch_reference, kv_state_reference, landmark_reference,
                        landmark_window_reference, phi_reference, random_phi, ttr_forward_reference)

__all__ = ["KernelConfig", "PhiWeights", "fused_unsupported_reasons", "kernel_branch_reference", "kv_state_fused",
           "kv_state_reference", "landmark_reference", "landmark_window_reference", "phi_reference", "random_phi",
           "run_fused_kernels", "triton_available", "ttr_forward_fused", "ttr_forward_reference"]
