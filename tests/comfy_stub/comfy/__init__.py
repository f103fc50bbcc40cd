"""Stand-in of ComfyUI's `comfy` package for attnplug's tests (see ../README.md). Not ComfyUI code."""
