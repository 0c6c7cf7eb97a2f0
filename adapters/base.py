"""The Adapter contract.

An adapter recognises one model family (`matches`), publishes its sites (`sites`), installs
the stages of a policy with hooks (`install`) and removes every trace of them (`remove`).
Rules: never patch a class globally, never copy a model's forward body, never
reassign `module.forward`; hooks and per-instance attributes only, all undone by `remove()`.
"""
from __future__ import annotations

import threading
import weakref
from typing import ClassVar

from tokenreduce.context import ThreadContext
from tokenreduce.hooks import HookSet, Recorder
from tokenreduce.reducers.base import SiteInfo


def class_names(obj) -> set:
    """Qualified names of every class in `obj`'s MRO ('timm.models.vision_transformer.VisionTransformer')."""
    return {f"{c.__module__}.{c.__name__}" for c in type(obj).__mro__}


def is_a(obj, *qualnames: str) -> bool:
    """isinstance by qualified class name: no import of the model library needed."""
    names = class_names(obj)
    return any(q in names for q in qualnames)


class PerThreadState:
    """Keeps the attributes named in PER_FORWARD per thread, so two threads may run one reduced
    model at once (each forward's bookkeeping is its own). PER_FORWARD maps a name to the factory
    of its value in a thread that has not set it (None: the value is None)."""

    PER_FORWARD: ClassVar[dict] = {}

    def _thread_local(self) -> threading.local:
        local = self.__dict__.get("_per_thread")
        if local is None:  # setdefault: two threads creating it at once share one
            local = self.__dict__.setdefault("_per_thread", threading.local())
        return local

    def __getattr__(self, name):  # only reached when normal lookup fails
        per = type(self).PER_FORWARD
        if name not in per:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        local = self._thread_local()
        try:
            return local.__dict__[name]
        except KeyError:
            value = per[name]() if per[name] is not None else None
            setattr(local, name, value)
            return value

    def __setattr__(self, name, value):
        if name in type(self).PER_FORWARD:
            setattr(self._thread_local(), name, value)
        else:
            super().__setattr__(name, value)


class ByCache:
    """What a prefill decided, found again by the KV cache object it filled: the decode steps that
    continue it may run on another thread than the prefill did."""

    def __init__(self):
        self._map = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def bind(self, cache, value) -> None:
        if cache is None:
            return
        try:
            with self._lock:
                self._map[cache] = value
        except TypeError:  # a cache that cannot be weakly keyed: the thread's own state serves
            pass

    def lookup(self, cache, fallback):
        """The value bound to `cache`, else `fallback` (the thread's latest: a copy of a cache, or
        one that cannot be weakly keyed, continues the prefill this thread ran last)."""
        try:
            with self._lock:
                return self._map.get(cache, fallback)
        except TypeError:
            return fallback


class Adapter:
    """Base class of every adapter."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    priority: ClassVar[int] = 0

    def __init__(self, model):
        self.model = model
        self.hooks = HookSet()
        self.recorder: Recorder | None = None
        # per-call inputs a reducer may need that the model's forward does not carry (e.g. the
        # question text for frame selection), per thread; the Handle shares it as `context`
        self.context = ThreadContext()

    @classmethod
    def matches(cls, model) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def sites(self) -> dict:
        """name -> SiteInfo for every site of this model."""
        raise NotImplementedError

    def install(self, stages: list, recorder: Recorder) -> None:
        """Install [(site, reducer)] (concrete sites, policy order)."""
        raise NotImplementedError

    def remove(self) -> None:
        self.hooks.remove()

    def flops(self, record) -> tuple | None:
        """(reduced, unreduced) analytic FLOPs of the last pass, or None if unknown."""
        return None


def site(name: str, family: str, index=None, depth=None, signals=(), **kw) -> SiteInfo:
    return SiteInfo(name=name, family=family, index=index, depth=depth, signals=frozenset(signals), **kw)
