"""ttr plugin (see plugin.py)."""
