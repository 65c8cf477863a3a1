"""Build script. Metadata lives in pyproject.toml; the C++ CPU extension (csrc/) is added here
by the C++ kernels issue."""
from setuptools import setup

setup()
