"""Fused inference kernels of the ttr layer (Triton) and their plain-PyTorch reference.

| module | one idea |
|---|---|
| `tiles` | `KernelConfig`: tile sizes of each pass, and the rules that turn them into block shapes |
| `capability` | what the kernels can serve (`fused_unsupported_reasons`); how φ splits between cuBLAS and the kernels |
| `serve_plan` | `ServePlan`: weights cast, indices placed, launches described once; a call only launches |
| `joint_plan` | `JointServePlan`: the joint layer's served call (far-field key pass, joint query pass, SDPA text rows) |
| `cudnn_landmarks` | the landmark softmax by cuDNN before the landmark pass (when it pays; within memory) |
| `tma_landmarks` | the landmark softmax as a Triton kernel of its own, fed by TMA, warp-specialised where Triton can |
| `launchers` | the Triton launches with their arguments in the kernels' order |
| `triton_ttr` | the kernels (imported at the first launch) |
| `fused` | `ttr_forward_fused`: one call for library use (a plan built and run), with the PyTorch fallback |
| `reference` | the plain-PyTorch ground truth the kernels are tested against |

Importing this package does not import triton.
"""
from .capability import fused_unsupported_reasons, joint_unsupported_reasons, triton_available
from .fused import kv_state_fused, run_fused_kernels, ttr_forward_fused
from .reference import (PhiWeights, kernel_branch_reference, kv_state_reference, landmark_reference,
                        landmark_window_reference, phi_reference, random_phi, ttr_forward_reference)
from .joint_plan import JointServePlan
from .serve_plan import ServePlan
from .tiles import KernelConfig

__all__ = ["JointServePlan", "KernelConfig", "PhiWeights", "ServePlan", "fused_unsupported_reasons",
           "joint_unsupported_reasons", "kernel_branch_reference",
           "kv_state_fused", "kv_state_reference", "landmark_reference", "landmark_window_reference", "phi_reference",
           "random_phi", "run_fused_kernels", "triton_available", "ttr_forward_fused", "ttr_forward_reference"]
