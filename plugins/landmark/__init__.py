"""landmark plugin: landmark selection and exact softmax against the landmarks (see plugin.py)."""
