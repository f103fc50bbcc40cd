"""landmark plugin (see plugin.py)."""
