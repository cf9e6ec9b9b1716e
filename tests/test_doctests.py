"""Every docstring example in the package runs (``pytest --doctest-modules optimize`` does the same)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import optimize

MODULES = sorted(m.name for m in pkgutil.walk_packages(optimize.__path__, "optimize."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
