"""The repository root is the import package `attnplug`: list its sub-packages under that name."""
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

SUBPACKAGES = find_packages(".", exclude=["tests", "tests.*", "examples", "examples.*", "build", "build.*"])


class BuildPy(build_py):
    """Leave this file out of the package: the root folder is `attnplug`, but setup.py is not part of it."""

    def find_package_modules(self, package, package_dir):  # noqa: ANN001, ANN201 - setuptools' signature
        return [m for m in super().find_package_modules(package, package_dir)
                if not (package == "attnplug" and m[1] == "setup")]


setup(packages=["attnplug"] + [f"attnplug.{name}" for name in SUBPACKAGES], cmdclass={"build_py": BuildPy})
