"""Build script: only the C++/CUDA extension lives here; metadata is in pyproject.toml."""
from setuptools import setup


def get_extensions():
    return []


setup(ext_modules=get_extensions())
