"""The Reducer contract: a dataclass that says what it needs and turns a TokenStream into a Plan."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import SiteError, PolicyError, choices
from ..stream import Plan, TokenStream


@dataclass(frozen=True)
class SiteInfo:
    """A site as an adapter publishes it.

    family: the site name without its index ("vision.block"); index: the index within the
    family (None for single sites such as "vision.out"); depth: how many layers the family
    spans (the model's depth for that tower); signals: the signals the adapter can capture for
    a reducer here; structured: only structured plans (whole frames / slices) are accepted;
    note: why a usual signal is missing (shown in errors). own_layer: the layer whose signals
    a reducer reads here by default (block i at vision.block.i, block i-1 at vision.layer.i,
    the last block at vision.out); max_layer: the latest layer whose signals exist here (default
    own_layer; a VLM's tower has run all its layers before its `vision.out`).
    """

    name: str
    family: str
    index: int | None = None
    depth: int | None = None
    signals: frozenset = frozenset()
    structured: bool = False
    note: str = ""
    own_layer: int | None = None
    max_layer: int | None = None


@dataclass
class Needs:
    """What a reducer asks the adapter to capture for one site.

    signals: name -> tuple of layers (indices in the site family's layer space; None = the
    site's own layer). prop_attn: add log(size) to attention logits in later layers (ToMe).
    source: track which original tokens each token holds (visualisation, unmerge).
    """

    signals: dict = field(default_factory=dict)
    prop_attn: bool = False
    source: bool = False


@dataclass
class Reducer:
    """Base class of every reducer. Subclasses are dataclasses whose docstring cites the paper."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    #: site families this reducer can run at
    site_families: ClassVar[tuple] = ()
    #: True when every plan keeps or drops whole frames / temporal slices
    structured: ClassVar[bool] = False
    #: True when plan() must run with autograd on (trainable reducers); otherwise plans are
    #: computed under no_grad (merges stay differentiable through apply_plan either way)
    differentiable: ClassVar[bool] = False

    def needs(self, site: SiteInfo) -> Needs:
        return Needs()

    def plan(self, stream: TokenStream) -> Plan | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def may_act(self, memo: dict) -> bool:
        """Whether this reducer may still act in the forward whose scratch space is `memo` (the
        stream's memo). An adapter computes no signal for a layer whose consumers have all
        finished (FrameFusion after its pruning step). (Not `active`: a reducer's own field
        may well carry that name.)"""
        return True

    # -- validation ---------------------------------------------------------------------------
    def check_site(self, site: SiteInfo) -> None:
        """Raise SiteError when this reducer cannot run at `site` (called by reduce())."""
        if site.structured and not self.structured:
            why = f": {site.note}" if site.note else " (whole frames or temporal slices)"
            raise SiteError(f"site {site.name!r} accepts only structured reducers{why}; {self.name} makes "
                            f"unstructured plans. Structured reducers that run here: "
                            f"{choices(_structured_names(site.family))}")
        if self.site_families and site.family not in self.site_families:
            raise SiteError(f"{self.name} cannot run at site {site.name!r}; it runs at: "
                            f"{choices(f + ('.{i}' if f in _INDEXED else '') for f in self.site_families)}")
        for sig, layers in self.needs(site).signals.items():
            if sig.split(":")[0] not in site.signals:  # "name:arg" carries a parameter
                why = f" ({site.note})" if site.note else ""
                raise SiteError(f"{self.name} at {site.name!r} needs the signal {sig!r}, which is not available "
                                f"there{why}; signals available here: {choices(sorted(site.signals))}")
            for layer in layers:
                if layer is None or site.depth is None:
                    continue
                if not (0 <= layer < site.depth):
                    raise SiteError(f"{self.name} at {site.name!r} asks for {sig!r} at layer {layer}; "
                                    f"valid layers: 0..{site.depth - 1}")
                last = site.max_layer if site.max_layer is not None else site.own_layer
                if last is not None and layer > last:
                    raise SiteError(f"{self.name} at {site.name!r} asks for {sig!r} from layer {layer}, "
                                    f"which runs after this site; use layers <= {last}")

    def params(self) -> dict:
        """Parameters that differ from their defaults (what a spec string needs)."""
        out = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            v = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if default is dataclasses.MISSING or v != default:
                out[f.name] = v
        return out

    @classmethod
    def param_names(cls) -> list:
        return [f.name for f in dataclasses.fields(cls) if f.init]

    def spec(self) -> str:
        from ..policy import format_call
        return format_call(self.name, self.params())


_INDEXED = {"vision.block", "vision.layer", "llm.layer", "stage"}


def _structured_names(family: str) -> list:
    """Registered reducers whose plans keep or drop whole frames / slices and run at `family`."""
    from ..registry import reducer_class, reducer_names
    out = []
    for n in reducer_names():
        try:
            cls = reducer_class(n)
            if getattr(cls, "structured", False) and (not cls.site_families or family in cls.site_families):
                out.append(n)
        except Exception:  # a plugin that fails to load does not spoil the message
            continue
    return out


# -- parameter checks shared by reducers ------------------------------------------------------
def check_budget(method: str, name: str, value: Any, *, allow_none: bool = False) -> None:
    """A `keep`-style budget: an int >= 0 or a float in (0, 1]."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(f"{method}: {name} must be an int count or a float fraction in (0, 1], got {value!r}")
    if isinstance(value, float) and not (0.0 < value <= 1.0):
        raise PolicyError(f"{method}: {name}={value} as a fraction must lie in (0, 1]; use an int for a count")
    if isinstance(value, int) and value < 0:
        raise PolicyError(f"{method}: {name}={value} must be >= 0")


def check_fraction(method: str, name: str, value: Any, lo: float = 0.0, hi: float = 1.0,
                   lo_open: bool = False, hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise PolicyError(f"{method}: {name} must be a number in {lb}{lo}, {hi}{rb}, got {value!r}")


def check_choice(method: str, name: str, value: Any, valid) -> None:
    if value not in valid:
        raise PolicyError(f"{method}: {name}={value!r} is not valid; choose one of: {choices(valid)}")
