"""`attnplug bench`: times one attention layer at Flux shapes, side by side in one run.

Every speed claim of this project is a ratio against torch SDPA (cuDNN, flash, memory-efficient
backends) measured in the same process on the same card: this module times those, every
registered backend that can run standalone, the ttr/landmark layer variants and SageAttention /
flash-attn when installed. The headline row of each ttr configuration is the product path,
`session ttr-<config>`: `Session.attention` with a ready layer, the configuration's own defaults and a
sampler step's call — what a user's call runs — next to the PyTorch path and the bare fused kernels of
`plugins/ttr/kernels` (a serve plan built once: the launches alone, also with the finite guard). It
reports medians of CUDA-event timings after warm-up, peak memory, each variant's ratio to the
fastest SDPA and its FLOP/byte floor, as a table and as JSON. On CPU it runs small shapes as a
smoke test. Entry point: `bench.run.main(argv)`.
"""
