"""Reducers: one method per file, each a dataclass whose docstring cites its paper."""
from .base import Needs, Reducer, SiteInfo

__all__ = ["Needs", "Reducer", "SiteInfo"]
