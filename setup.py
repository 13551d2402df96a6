# The only thing setup.py does: wire the cffi out-of-line extension (csrc/build_native.py).
from setuptools import setup

setup(cffi_modules=["csrc/build_native.py:ffibuilder"])
