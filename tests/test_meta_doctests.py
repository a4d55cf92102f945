"""Each public class of facemeta.meta carries a short runnable example in its docstring (issue 27, item 8, as
learn2learn's do); this runs them all with doctest."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import facemeta.meta

MODULES = sorted(m.name for m in pkgutil.iter_modules(facemeta.meta.__path__, "facemeta.meta."))


def _public_classes(module) -> list[type]:
    names = getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")])
    return [obj for n in names if inspect.isclass(obj := getattr(module, n, None)) and obj.__module__ == module.__name__]


@pytest.mark.parametrize("name", MODULES)
def test_doctests_pass(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (run pytest -s)"


@pytest.mark.parametrize("name", MODULES)
def test_every_public_class_has_an_example(name):
    module = importlib.import_module(name)
    missing = [c.__name__ for c in _public_classes(module) if ">>>" not in (c.__doc__ or "")]
    assert not missing, f"{name}: public classes without a runnable example: {missing}"


def test_the_examples_are_found():
    classes = [c for n in MODULES for c in _public_classes(importlib.import_module(n))]
    assert {"MAML", "Reptile", "MLDG", "MetaLearner", "MetaStepResult", "Episode", "EpisodeSampler"} <= {
        c.__name__ for c in classes}
