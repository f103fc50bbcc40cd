"""Stand-in of ComfyUI's `comfy_api` package (see ../README.md)."""
