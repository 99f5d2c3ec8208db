# setuptools ignores cffi_modules in setup.cfg (the extension would silently not be built).
from setuptools import setup

setup(cffi_modules=["cdefs/build_tagkernel.py:ffibuilder"])
