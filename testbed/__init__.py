"""Reference testbed: a small trained Flux-architecture model on handwritten-digit mosaics.

Flux weights cannot be downloaded here and quality measured on random weights means nothing, so
attnplug ships a real, trained diffusers `FluxTransformer2DModel` (2 double + 6 single blocks,
4 heads x 32, 2.8 M parameters) whose attention does real work: each of its 64 conditioning tokens
(digit class + grid cell) must steer its own 8x8 cell of a 64x64 mosaic of scikit-learn digits.
`data` builds the prompts, mosaics and token packing; `model` the network and its committed
weights (`weights/`); `train` the flow-matching training script; `classifier` reads digits back
to score prompt adherence; `sampling` the Euler sampler and the fidelity metrics; `registry` the testbeds by
name (`default`; `grid64` and `grid128`, the same network at 4 096 and 16 384 image tokens); `transfer` serves
a checkpoint of one size on another; `step_cache` puts diffusers' First Block Cache on the transformer. Nothing here is
imported by `import attnplug`; it needs the `testbed` extra (diffusers, scikit-learn).
"""
