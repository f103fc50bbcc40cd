"""The repository root is the import package `attnplug` (DESIGN.md): list its sub-packages under that name."""
from setuptools import find_packages, setup

SUBPACKAGES = find_packages(".", exclude=["tests", "tests.*", "examples", "examples.*", "build", "build.*"])
setup(packages=["attnplug"] + [f"attnplug.{name}" for name in SUBPACKAGES])
