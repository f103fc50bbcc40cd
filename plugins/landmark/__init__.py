"""landmark plugin: landmark selection and exact softmax against the landmarks, optionally plus a
local window per image query (see plugin.py)."""
