"""Named registries, filled where things are defined (timm's ``register_model`` is the model).

A module that defines a training method, a head, a gallery backend, a set... registers it in one line, and
every list of choices (CLI ``choices=``, config validation, error messages) reads the registry, so adding a
thing touches one place::

    >>> HEADS = Registry("head")
    >>> @HEADS.register("plain")
    ... def plain():
    ...     return "plain head"
    >>> _ = HEADS.register("other", lambda: "other head")
    >>> HEADS.names()
    ('plain', 'other')
    >>> "plain" in HEADS, HEADS.get("plain")()
    (True, 'plain head')
    >>> HEADS.get("nope")
    Traceback (most recent call last):
    ...
    facemeta.registry.RegistryError: unknown head 'nope' (choose one of: plain, other)

A leaf module (layer 6): it imports nothing of facemeta, so any layer may hold a registry. Pass
``error=`` a :class:`facemeta.errors.FacemetaError` subclass (e.g. ``ConfigError``) for unknown names that
the command line should print as one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")


class RegistryError(LookupError):
    """A name that is not in a registry (the message lists the choices)."""

    def __str__(self) -> str:  # LookupError's KeyError-like quoting would wrap the line in quotes
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Names to objects, in registration order; ``register`` as a decorator or a call, ``get`` with a one-line
    error listing the choices (also as ``registry[name]``), ``names()``, ``in``, ``len`` and iteration over the
    names."""

    def __init__(self, kind: str, error: type[Exception] = RegistryError):
        self.kind = kind
        self.error = error
        self._items: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: Any = None) -> Any:
        """Register `obj` under `name` and return it; without `obj`, a decorator that does so.
        A name registered twice is an error (two definitions of one thing)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def add(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = item
            return item

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """The object registered as `name`; ``self.error`` (one line naming the choices) when there is none."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise self.error(f"unknown {self.kind} {name!r} (choose one of: {', '.join(self._items)})") from None

    __getitem__ = get  # dict-like lookup, same error

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order (use as argparse ``choices``)."""
        return tuple(self._items)

    def items(self) -> list[tuple[str, T]]:
        """(name, object) pairs in registration order."""
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"
