"""Name -> reducer class, model -> adapter class.

First-party reducers and adapters are declared as entry points in our own pyproject exactly as
a third party would declare theirs (groups `tokenreduce.reducers` and `tokenreduce.adapters`),
and loaded lazily on first use. The core never imports a model-family module by name.
"""
from __future__ import annotations

import importlib
import pkgutil
import re
import warnings
from importlib.metadata import entry_points

from .errors import UnknownMethodError, UnsupportedModelError, choices

REDUCER_GROUP = "tokenreduce.reducers"
ADAPTER_GROUP = "tokenreduce.adapters"
SCORER_GROUP = "tokenreduce.scorers"

_reducers: dict = {}
_adapters: dict = {}
_loaded = {"reducers": False, "adapters": False}


def _identifier(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return "_" + name if name[:1].isdigit() else name


def _register(table: dict, kind: str, cls):
    """One rule for name clashes, whenever the modules load: a user's registration replaces a
    built-in (tokenreduce's own) class of the same name, a built-in never replaces a user's, and
    every clash is reported."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{cls.__name__} has no `name`")
    if kind == "reducer" and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(cls.name)):
        # a policy spec names the method as an identifier: another name could not be written back
        raise ValueError(f"{cls.__name__}: reducer name {cls.name!r} must be an identifier (letters, digits and "
                         f"'_', not starting with a digit), e.g. {_identifier(str(cls.name))!r}")
    prev = table.get(cls.name)
    if prev is not None and prev is not cls and f"{prev.__module__}.{prev.__qualname__}" != \
            f"{cls.__module__}.{cls.__qualname__}":
        builtin = lambda c: c.__module__.startswith("tokenreduce.")  # noqa: E731
        keep = prev if builtin(cls) and not builtin(prev) else cls
        warnings.warn(f"{kind} name {cls.name!r} is taken by both {prev.__module__}.{prev.__qualname__} and "
                      f"{cls.__module__}.{cls.__qualname__}; using {keep.__module__}.{keep.__qualname__}",
                      stacklevel=3)
        if keep is prev:
            return cls
    table[cls.name] = cls
    return cls


def register_reducer(cls):
    """Class decorator / function: make a reducer available by its `name`. The class must be a
    dataclass subclass of tokenreduce.Reducer (its fields are the parameters a policy may set)."""
    import dataclasses

    from .reducers.base import Reducer
    if not (isinstance(cls, type) and issubclass(cls, Reducer)):
        raise TypeError(f"register_reducer: {cls!r} is not a subclass of tokenreduce.Reducer")
    if not dataclasses.is_dataclass(cls) or ("__init__" in vars(cls) and "__dataclass_fields__" not in vars(cls)):
        # an own __init__ outside @dataclass: its arguments are not the fields a policy can set
        raise TypeError(f"register_reducer: {cls.__name__} must be a dataclass (decorate it with @dataclass under "
                        "@register_reducer): its fields are the parameters a policy may set")
    return _register(_reducers, "reducer", cls)


def register_adapter(cls):
    """Class decorator / function: make an adapter available for `reduce()` to find."""
    return _register(_adapters, "adapter", cls)


def _load_group(group: str, into: dict) -> None:
    for ep in entry_points(group=group):
        if ep.name in into:
            continue
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 - a missing optional dependency, or a broken plugin:
            # skip it (every other method stays usable) and say why on lookup
            into.setdefault("__failed__", {})[ep.name] = exc
            continue
        name = getattr(obj, "name", ep.name) if isinstance(obj, type) else ep.name
        if group != SCORER_GROUP and name != ep.name:  # specs are written with the class's own name
            into.setdefault("__failed__", {})[ep.name] = ValueError(
                f"entry point {ep.name!r} names {obj.__module__}.{obj.__qualname__}, whose name is {name!r}; "
                "the two must be equal")
            continue
        into[ep.name] = obj


def _load_reducers() -> None:
    if _loaded["reducers"]:
        return
    _load_group(REDUCER_GROUP, _reducers)
    # Running from a source tree without installation: the core's own reducers are still found.
    from . import reducers as pkg
    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name != "base":
            importlib.import_module(f"{pkg.__name__}.{mod.name}")
    _loaded["reducers"] = True


def _load_adapters() -> None:
    if _loaded["adapters"]:
        return
    _load_group(ADAPTER_GROUP, _adapters)
    _loaded["adapters"] = True


def reducer_names() -> list:
    _load_reducers()
    return sorted(k for k in _reducers if not k.startswith("__"))


def reducer_class(name: str):
    _load_reducers()
    if not isinstance(name, str):
        raise UnknownMethodError(f"a method is named by a string, got {type(name).__name__} {name!r}; "
                                 f"valid methods: {choices(reducer_names())}")
    if name not in _reducers or name.startswith("__"):
        failed = _reducers.get("__failed__", {})
        why = f" ({name} is installed but failed to load: {failed[name]})" if name in failed else ""
        raise UnknownMethodError(f"unknown method {name!r}{why}; valid methods: {choices(reducer_names())}")
    return _reducers[name]


def adapter_classes() -> list:
    _load_adapters()
    return sorted((c for k, c in _adapters.items() if not k.startswith("__")),
                  key=lambda c: -getattr(c, "priority", 0))


def find_adapter(model):
    """The adapter class that recognises `model` (highest priority first)."""
    classes = adapter_classes()
    for cls in classes:
        if cls.matches(model):
            return cls
    failed = _adapters.get("__failed__", {})
    extra = f" (adapters that failed to import: {choices(f'{k}: {v}' for k, v in failed.items())})" if failed else ""
    supported = choices(f"{c.name} ({c.family})" for c in classes) if classes else \
        "none registered - is tokenreduce installed (pip install -e .)?"
    raise UnsupportedModelError(f"no adapter recognises {type(model).__module__}.{type(model).__name__}; "
                                f"supported families: {supported}{extra}")


# -- frame scorers (models that score frames for frame selection; they live outside the core) --
_scorers: dict = {}


def register_scorer(name: str):
    """Decorator: make a frame scorer factory available by name to `frame_select`."""
    def deco(obj):
        _scorers[name] = obj
        return obj
    return deco


def scorer_names() -> list:
    _load_group(SCORER_GROUP, _scorers)
    return sorted(k for k in _scorers if not k.startswith("__"))


def scorer_factory(name: str):
    _load_group(SCORER_GROUP, _scorers)
    if name not in _scorers or name.startswith("__"):
        failed = _scorers.get("__failed__", {})
        why = f" ({name} failed to import: {failed[name]})" if name in failed else ""
        raise UnknownMethodError(f"unknown frame scorer {name!r}{why}; valid scorers: {choices(scorer_names())}")
    return _scorers[name]
