"""PEP 517 build backend: setuptools' own, building against the torch already installed.

``pip install .`` builds in an isolated environment that hides the interpreter's
site-packages, and so torch. The extension must be compiled against the torch it will run
with (same version, same C++ ABI, CUDA or not), never against a second, downloaded one, so the
interpreter's site-packages are appended to ``sys.path`` (after the isolated environment's own
packages) before setuptools runs ``setup.py``. With ``--no-build-isolation`` this changes
nothing. ``setup.py`` stops with a one-line message when no torch is installed.
"""
import os
import site
import sys

from setuptools import build_meta as _setuptools_backend
from setuptools.build_meta import *  # noqa: F401,F403  (the PEP 517/660 hooks)


def _append_installed_site_packages() -> None:
    paths = list(site.getsitepackages())
    if sys.prefix == sys.base_prefix:  # not a venv: `pip install --user torch` counts too
        paths.append(site.getusersitepackages())
    for path in paths:
        if os.path.isdir(path) and path not in sys.path:
            sys.path.append(path)


_append_installed_site_packages()
__all__ = _setuptools_backend.__all__
