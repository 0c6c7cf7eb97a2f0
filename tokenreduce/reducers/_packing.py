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


_PADDING_CLAIMS: list = []


def padding_claims() -> bool:
    """Whether apply_plan lets a padding slot (valid=False) claim its token away from the slot
    the plan's `assign` gives it. Checked once on a 2-token stream, so this module keeps working,
    exactly, the day apply_plan stops doing so."""
    if not _PADDING_CLAIMS:
        from ..stream import apply_plan
        st = TokenStream.start(torch.tensor([[[1.0], [2.0]]]))
        plan = Plan(keep=torch.tensor([[0, 1]]), assign=torch.tensor([[0, 0]]), normalize=False,
                    valid=torch.tensor([[True, False]]))
        out, _ = apply_plan(st, plan)
        _PADDING_CLAIMS.append(float(out.x[0, 0, 0]) != 3.0)
    return _PADDING_CLAIMS[0]


def pack(stream: TokenStream, keeps: list, assign: Tensor | None = None, weight: Tensor | None = None,
         normalize: bool = True, spare: list | None = None) -> Plan:
    """One Plan from per-sample kept indices (each a 1-D tensor in the reducer's order).

    Samples that keep fewer tokens than the longest get padding slots (valid=False). The
    current apply_plan makes every slot of `keep`, padding included, claim its token, so a
    padding slot must point at a token that folds nowhere else: first invalid (batch padding)
    tokens, then tokens the plan drops (assign == -1), then, only if those run out, the tokens
    listed in `spare[b]` (least harm first), which are then dropped from their merge. Where
    apply_plan leaves the tokens of padding slots where `assign` puts them (`padding_claims()`
    is False) any token the sample does not keep serves, and nothing is lost.
    """
    B, N = stream.pos.shape
    dev = stream.pos.device
    K = max((len(k) for k in keeps), default=0)
    if assign is not None:
        assign = assign.clone()
    rows, valid = [], torch.ones(B, K, dtype=torch.bool, device=dev)
    for b, kb in enumerate(keeps):
        kb = kb.to(device=dev, dtype=torch.long)
        short = K - len(kb)
        if short:
            taken = torch.zeros(N, dtype=torch.bool, device=dev)
            taken[kb] = True
            cand = []
            if stream.valid is not None:
                cand.append(torch.nonzero(~stream.valid[b] & ~taken).squeeze(1))
            if assign is not None and not padding_claims():
                assign_free = ~taken if stream.valid is None else ~taken & stream.valid[b]
                cand.append(torch.nonzero(assign_free).squeeze(1))
            elif assign is not None:
                free = (assign[b] < 0) & ~taken
                if stream.valid is not None:
                    free &= stream.valid[b]
                cand.append(torch.nonzero(free).squeeze(1))
            else:
                rest = ~taken if stream.valid is None else ~taken & stream.valid[b]
                cand.append(torch.nonzero(rest).squeeze(1))
            pad = torch.cat(cand)[:short] if cand else kb[:0]
            if len(pad) < short and spare is not None and assign is not None:
                more = spare[b].to(device=dev, dtype=torch.long)
                more = more[~torch.isin(more, torch.cat([kb, pad]))][:short - len(pad)]
                assign[b, more] = -1
                pad = torch.cat([pad, more])
            if len(pad) < short:  # cannot happen: fewer tokens than slots
                raise RuntimeError("tokenreduce: no token left to pad a ragged plan")
            kb = torch.cat([kb, pad])
            valid[b, K - short:] = False
        rows.append(kb)
    keep = torch.stack(rows) if rows else torch.zeros(B, 0, dtype=torch.long, device=dev)
    ragged = not bool(valid.all())
    return Plan(keep=keep, assign=assign, weight=weight, normalize=normalize, valid=valid if ragged else None)


def visual_indices(stream: TokenStream, b: int) -> Tensor:
    """Current indices of sample b's visual (removable, valid) tokens, ascending."""
    return torch.nonzero(stream.visual[b]).squeeze(1)


def protected_indices(stream: TokenStream, b: int) -> Tensor:
    """Current indices of sample b's valid non-visual tokens (CLS, registers, newlines), ascending."""
    m = stream.protected[b]
    if stream.valid is not None:
        m = m & stream.valid[b]
    return torch.nonzero(m).squeeze(1)
