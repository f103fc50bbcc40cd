"""ttr plugin: learned kernel-regression attention and the hybrid layer (see plugin.py)."""
