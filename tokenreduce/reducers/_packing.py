"""Private helpers for reducers that decide per sample (VisionZip, PruMerge+, DyCoke TTM).

Not a reducer module (the registry skips names starting with "_")."""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import PolicyError, SiteError
from ..stream import Plan, TokenStream
from .base import SiteInfo


def check_count(method: str, name: str, value, *, allow_none: bool = False, minimum: int = 0) -> None:
    """An int count >= minimum (bools refused)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PolicyError(f"{method}: {name} must be an int >= {minimum}, got {value!r}")


def check_layer(method: str, value) -> None:
    """A tower layer index (negatives count from the end) or None."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise PolicyError(f"{method}: layer must be an int layer index (negatives count from the end) or None, "
                          f"got {value!r}")


def resolve_layer(method: str, layer: int | None, site: SiteInfo | None, stream: TokenStream | None = None,
                  default: str = "own") -> int:
    """An explicit tower layer index for `layer` at `site`.

    None means the site's own layer (default="own": the feature layer at a VLM's vision.out) or
    the tower's last layer (default="last"). Negative indices count from the tower's depth.
    """
    depth = site.depth if site is not None else (stream.depth if stream is not None else None)
    own = site.own_layer if site is not None else (stream.own_layer if stream is not None else None)
    where = site.name if site is not None else (stream.site if stream is not None else "this site")
    if layer is None:
        if default == "own":
            if own is None:
                raise SiteError(f"{method} at {where!r} reads the signals of the feature layer, which this model "
                                "does not define (a multi-layer feature selection?); pass layer=<int>")
            return own
        layer = -1
    if layer < 0:
        if depth is None:
            raise SiteError(f"{method} at {where!r}: cannot resolve layer={layer}, the tower depth is unknown; "
                            "pass a non-negative layer index")
        if layer < -depth:
            raise SiteError(f"{method} at {where!r}: layer={layer} is out of range; valid layers: "
                            f"0..{depth - 1} or -{depth}..-1")
        return depth + layer
    return layer


def stream_site(stream: TokenStream) -> SiteInfo | None:
    return stream.info if isinstance(stream.info, SiteInfo) else None


def pack(stream: TokenStream, keeps: list, assign: Tensor | None = None, weight: Tensor | None = None,
         normalize: bool = True) -> Plan:
    """One Plan from per-sample kept indices (each a 1-D tensor in the reducer's order).

    Samples that keep fewer tokens than the longest get padding slots (valid=False) pointing at
    tokens the sample does not keep; apply_plan lets padding slots claim nothing, so those tokens
    stay wherever `assign` sends them.
    """
    B, N = stream.pos.shape
    dev = stream.pos.device
    K = max((len(k) for k in keeps), default=0)
    rows, valid = [], torch.ones(B, K, dtype=torch.bool, device=dev)
    for b, kb in enumerate(keeps):
        kb = kb.to(device=dev, dtype=torch.long)
        short = K - len(kb)
        if short:
            free = torch.ones(N, dtype=torch.bool, device=dev)
            free[kb] = False
            kb = torch.cat([kb, torch.nonzero(free).squeeze(1)[:short]])
            valid[b, K - short:] = False
        rows.append(kb)
    keep = torch.stack(rows) if rows else torch.zeros(B, 0, dtype=torch.long, device=dev)
    ragged = not bool(valid.all())
    return Plan(keep=keep, assign=assign, weight=weight, normalize=normalize, valid=valid if ragged else None)


def merge_inputs(stream: TokenStream, layer: int):
    """The tower signals and empty merge bookkeeping shared by the CLS-attention mergers:
    (cls attention (B, N), keys (B, N, D), assign (B, N) all -1, weight (B, N) all 1)."""
    B, N = stream.pos.shape
    dev = stream.pos.device
    attn = stream.signal("cls_attn", layer).float()
    keys = stream.signal("keys", layer).float()
    assign = torch.full((B, N), -1, dtype=torch.long, device=dev)
    weight = torch.ones(B, N, dtype=torch.float32, device=dev)
    return attn, keys, assign, weight


def visual_indices(stream: TokenStream, b: int) -> Tensor:
    """Current indices of sample b's visual (removable, valid) tokens, ascending."""
    return torch.nonzero(stream.visual[b]).squeeze(1)


def protected_indices(stream: TokenStream, b: int) -> Tensor:
    """Current indices of sample b's valid non-visual tokens (CLS, registers, newlines), ascending."""
    m = stream.protected[b]
    if stream.valid is not None:
        m = m & stream.valid[b]
    return torch.nonzero(m).squeeze(1)
