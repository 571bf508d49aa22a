"""The Triton backend with interpreted kernels, for the Triton test modules.

``TRITON_INTERPRET=1`` must be set before triton (and the backend's kernels) are first
imported; it is put back afterwards so that modules collected later see the session's own
setting. Each test module sets it again while its tests run (:func:`interpreted`).
"""
import dataclasses
import os

import pytest
import torch

_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
    from rmi_ext import triton_backend as tb
finally:
    if _INTERPRET_BEFORE is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _INTERPRET_BEFORE

tbi = tb._module_for(torch.empty(0))  # the backend's stages with interpreted kernels (CPU)


def interpreted(required: bool, **builder_options):
    """Body of a module-scoped fixture: ``TRITON_INTERPRET=1`` and the interpreter builder's
    options replaced (e.g. ``sanitize_overflow``) until the module ends. ``required=False``
    keeps going on a triton whose interpreter lacks those options."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    try:
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        mp.setattr(builder, "options", dataclasses.replace(builder.options, **builder_options))
    except (ImportError, AttributeError, TypeError):
        if required:
            raise
    yield
    mp.undo()
