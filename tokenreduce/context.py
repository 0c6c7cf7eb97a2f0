"""handle.context: inputs for reducers that a model's forward does not carry, kept per thread."""
from __future__ import annotations

import threading
from collections.abc import MutableMapping

_HIDDEN = object()  # a key this thread deleted while the creating thread's value stays for the others


class ThreadContext(MutableMapping):
    """A dict whose values belong to the thread that set them, so threads running one reduced
    model at once each give their own question (frame selection) to their own forward.

    Values set by the thread that created it (the one that called `reduce()`) are the defaults
    every thread reads until it sets (or deletes) that key itself; values another thread sets
    are seen by that thread only. A mapping, not a dict subclass: `copy()` and `|` give a plain
    dict of this thread's view (what `json.dumps(dict(ctx))` serialises).
    """

    def __init__(self, initial=()):
        self._shared: dict = {}
        self._local = threading.local()
        self._local.layer = self._shared  # the creating thread writes the shared defaults
        self.update(initial)

    def _layer(self) -> dict:
        layer = getattr(self._local, "layer", None)
        if layer is None:  # thread-local: a new thread (even one reusing a dead thread's id) starts empty
            layer = self._local.layer = {}
        return layer

    def __getitem__(self, key):
        layer = self._layer()
        value = layer[key] if key in layer else self._shared.get(key, _HIDDEN)
        if value is _HIDDEN:
            raise KeyError(key)
        return value

    def __setitem__(self, key, value):
        self._layer()[key] = value

    def __delitem__(self, key):
        layer = self._layer()
        if key not in self:
            raise KeyError(key)
        if layer is self._shared or key not in self._shared:
            del layer[key]
        else:
            layer[key] = _HIDDEN

    def __iter__(self):
        layer = self._layer()
        keys = dict.fromkeys(self._shared) if layer is not self._shared else {}
        keys.update(dict.fromkeys(layer))
        return iter([k for k in keys if (layer[k] if k in layer else self._shared[k]) is not _HIDDEN])

    def __len__(self):
        return sum(1 for _ in self)

    def copy(self) -> dict:
        return dict(self)

    def __or__(self, other):
        return {**self, **other} if hasattr(other, "keys") else NotImplemented

    def __ror__(self, other):
        return {**other, **self} if hasattr(other, "keys") else NotImplemented

    def replace(self, values) -> None:
        """This thread's values become exactly `values` (handle.context = {...})."""
        if not hasattr(values, "keys"):
            raise TypeError(f"handle.context takes a mapping (e.g. {{'question': [...]}}), got "
                            f"{type(values).__name__}")
        values = dict(values)  # read first: `values` may be this very context
        self.clear()
        self.update(values)

    def __repr__(self):
        return f"{type(self).__name__}({dict(self)!r})"
