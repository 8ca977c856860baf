"""Build hook: everything is in pyproject.toml except the cffi extension."""

from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])
