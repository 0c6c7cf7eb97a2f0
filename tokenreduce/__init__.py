"""tokenreduce: make vision-language and video models carry fewer visual tokens.

    handle = tokenreduce.reduce(model, "vision.block.*=tome(r=13)")
    ...
    handle.remove()
"""
from .api import Handle, describe, reduce, sites, unreduce
from .errors import (PolicyError, SiteError, TokenReduceError, UnknownMethodError,
                     UnsupportedModelError)
from .policy import Policy, Stage, make_reducer, parse_spec
from .reducers.base import Needs, Reducer, SiteInfo
from .registry import (find_adapter, reducer_class, reducer_names, register_adapter,
                       register_reducer)
from .stream import Kind, Plan, TokenStream, apply_plan

__version__ = "0.1.0"


def methods() -> dict:
    """name -> reducer class, for every registered method."""
    return {n: reducer_class(n) for n in reducer_names()}


__all__ = [
    "Handle", "Kind", "Needs", "Plan", "Policy", "PolicyError", "Reducer", "SiteError", "SiteInfo",
    "Stage", "TokenReduceError", "TokenStream", "UnknownMethodError", "UnsupportedModelError",
    "apply_plan", "describe", "find_adapter", "make_reducer", "methods", "parse_spec", "reduce",
    "reducer_class", "reducer_names", "register_adapter", "register_reducer", "sites", "unreduce",
]
