"""Build script: puts the kernel sources into the package; the metadata is in pyproject.toml.

The wheel is pure Python (``py3-none-any``): it carries the C++/CUDA sources of ``csrc/`` as
``torchgraph/_csrc/`` and compiles nothing. ``torchgraph/_extension.py`` compiles them on the
first import (or with ``torchgraph build-kernels``) for the machine and the torch that will run
them, so building a wheel or an sdist needs neither torch nor a compiler.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def kernel_sources():
    """Paths of the kernel sources under csrc/, relative to csrc/ (every folder, so new ops come along)."""
    root = os.path.join(HERE, "csrc")
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(KERNEL_SOURCE_SUFFIXES):
                yield os.path.relpath(os.path.join(folder, name), root)


class BuildPyWithKernelSources(build_py):
    """build_py that also copies csrc/ to torchgraph/_csrc/ in the build (wheels, sdist installs)."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's csrc/ directly
            return
        for relative in kernel_sources():
            target = os.path.join(self.build_lib, "torchgraph", "_csrc", relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(os.path.join(HERE, "csrc", relative), target)


setup(cmdclass={"build_py": BuildPyWithKernelSources})
