"""`attnplug bench`: times one attention layer at Flux shapes, side by side in one run.

Every speed claim of this project is a ratio against torch SDPA (cuDNN, flash, memory-efficient
backends) measured in the same process on the same card: this module times those, every
registered backend that can run standalone, the ttr/landmark layer variants (PyTorch path and the
fused Triton path of `plugins/ttr/kernels`) and SageAttention / flash-attn when installed; it
reports medians of CUDA-event timings after warm-up, peak memory, each variant's ratio to the
fastest SDPA and its FLOP/byte floor, as a table and as JSON. On CPU it runs small shapes as a
smoke test. Entry point: `bench.run.main(argv)`.
"""
