"""TokenStream (what a reducer sees at a site) and Plan (what it returns).

`apply_plan` is the one function that turns a plan into a shorter stream: a gather for
pruning, a weighted mean (by default weighted by token size) for merging. Adapters apply the
same `keep` indices to their side tensors; reducers never slice model tensors themselves.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .ops import fixed_under_compile


def _evolve(obj, **changes):
    """dataclasses.replace(obj, **changes) for a TokenStream or a Plan (init fields only, no
    __post_init__) without the generated __init__: replace took about 20 us of host time a call,
    four calls a reduced ViT block (measured on the CPU). Under torch.compile: replace itself."""
    if torch.compiler.is_compiling():
        return replace(obj, **changes)
    fields = obj.__dataclass_fields__
    unknown = [k for k in changes if k not in fields]
    if unknown:
        raise TypeError(f"{type(obj).__name__} has no field(s) {', '.join(unknown)}; valid: {', '.join(fields)}")
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    return new


class Kind(enum.IntEnum):
    """What a token is. Only VISUAL tokens may be removed or merged away."""

    VISUAL = 0
    TEXT = 1
    PROTECTED = 2  # CLS, distillation and register tokens, system prompt: never removed


# How apply_plan orders the survivors.
#   "prefix":   protected tokens first (in their order), then the reducer's order. ViTs read
#               CLS / distillation tokens by index, the rest of the sequence is a set.
#   "sequence": original sequence order. Causal LLMs and RoPE need it.
ORDERS = ("prefix", "sequence")


class Signals:
    """Signals captured by the adapter during this forward, keyed by (name, layer).

    Each value is stored with the original positions (`pos`) of the tokens it was computed on,
    so a reducer at a later site can read it for the tokens that exist *now*: tokens removed
    since are skipped, merged tokens read their representative's value.
    """

    def __init__(self, size_hint: int | None = None):
        self._store: dict[tuple[str, int | None], tuple[Tensor, Any]] = {}
        self.size_hint = size_hint  # an upper bound on original positions (saves a device sync)

    def put(self, name: str, layer: int | None, pos: Tensor, value: Any) -> None:
        self._store[(name, layer)] = (pos, value)

    def has(self, name: str, layer: int | None = None) -> bool:
        return (name, layer) in self._store

    def raw(self, name: str, layer: int | None = None):
        return self._store[(name, layer)]

    def get(self, name: str, layer: int | None, pos: Tensor) -> Tensor:
        """The signal for the tokens whose original positions are `pos` (B, N)."""
        try:
            src_pos, value = self._store[(name, layer)]
        except KeyError:
            have = ", ".join(f"{n}@{l}" for n, l in self._store) or "none"
            raise KeyError(f"signal {name!r} at layer {layer} was not captured (captured: {have})") from None
        return remap(value, src_pos, pos, self.size_hint)

    def clear(self) -> None:
        self._store.clear()


def _check_keep(keep) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"keep must be an int count or a float fraction in (0, 1], got {keep!r}")


def remap(value: Tensor, src_pos: Tensor, pos: Tensor, size_hint: int | None = None) -> Tensor:
    """Gather `value` (B, N', ...) computed on tokens `src_pos` (B, N') for tokens `pos` (B, N).

    A value that is not a tensor (e.g. a list of question strings, one per sample) describes
    the samples, not their tokens, and is returned unchanged.
    """
    if not torch.is_tensor(value):
        return value
    if src_pos is pos:  # nothing changed since the capture (identity: no device sync)
        return value
    if src_pos.shape == pos.shape and pos.device.type == "cpu" and torch.equal(src_pos, pos):
        return value
    B = pos.shape[0]
    table_size = size_hint if size_hint is not None else int(max(src_pos.max(), pos.max())) + 1
    table = torch.zeros(B, table_size, dtype=torch.long, device=pos.device)
    table.scatter_(1, src_pos, torch.arange(src_pos.shape[1], device=pos.device).expand(B, -1))
    idx = table.gather(1, pos)
    return gather_tokens(value, idx)


def gather_tokens(t: Tensor, idx: Tensor) -> Tensor:
    """Gather along dim 1 of `t` (B, N, ...) with `idx` (B, K)."""
    if t.dim() == 2:
        return t.gather(1, idx)
    extra = t.shape[2:]
    return t.gather(1, idx.reshape(*idx.shape, *([1] * len(extra))).expand(*idx.shape, *extra))


@dataclass
class TokenStream:
    """The tokens at a site, plus everything a reducer may need to know about them.

    x: (B, N, C) token features. pos: (B, N) original position of each token. size: (B, N)
    how many original tokens each one stands for. kind: (B, N) `Kind` values. frame: (B, N)
    frame index or -1. grid: (T, H, W) of the visual tokens where known (row_grids: per sample,
    where the samples' grids differ; `grid_of(b)` reads either). valid: (B, N) for
    ragged batches (None = all valid). patch: (B, N) index of each visual token inside its
    frame's H x W grid (-1 for others). item: (B, N) which image / video of its row a visual
    token comes from, where rows hold several. signals: what the adapter captured because a reducer
    asked. source: optional (B, N, N0) 0/1 matrix of which original tokens each token holds.
    memo: scratch space that lives for one forward (state spanning several stages).
    """

    x: Tensor
    pos: Tensor
    size: Tensor
    kind: Tensor
    frame: Tensor
    grid: tuple[int, int, int] | None = None
    valid: Tensor | None = None
    signals: Signals = field(default_factory=Signals)
    site: str = ""
    layer: int | None = None
    depth: int | None = None
    source: Tensor | None = None
    order: str = "prefix"
    memo: dict = field(default_factory=dict)
    own_layer: int | None = None  # the layer whose signals `signal(name)` reads by default
    info: Any = None  # the SiteInfo of the site (adapters set it)
    num_protected: int | None = None  # protected tokens per sample when known on the host (saves syncs)
    patch: Tensor | None = None  # (B, N) index of each visual token inside its frame's grid, -1 otherwise
    # per sample (T, H, W) where the samples' grids differ (a batch mixing image sizes, or an
    # image row and a video row): None for a sample whose own items differ too
    row_grids: tuple | None = None
    # (B, N) which image / video of its row each visual token comes from (0, 1, ...; -1 for
    # others), where a row may hold several (the LLM's stream); None when unknown or one per row
    item: Tensor | None = None

    def grid_of(self, b: int):
        """The (T, H, W) grid of sample b's visual tokens, or None when unknown."""
        if self.row_grids is not None:
            return self.row_grids[b]
        return self.grid

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def start(cls, x: Tensor, *, num_prefix: int = 0, grid=None, frame: Tensor | None = None,
              kind: Tensor | None = None, track_source: bool = False, order: str = "prefix",
              pos: Tensor | None = None) -> "TokenStream":
        """A fresh stream over all tokens of `x`: positions 0..N-1, sizes 1."""
        B, N = x.shape[:2]
        dev = x.device
        if pos is None:
            pos = torch.arange(N, device=dev).expand(B, N).clone()
        num_protected = None
        if kind is None:
            kind = torch.full((B, N), int(Kind.VISUAL), dtype=torch.long, device=dev)
            kind[:, :num_prefix] = int(Kind.PROTECTED)
            num_protected = num_prefix
        if frame is None:
            frame = torch.full((B, N), -1, dtype=torch.long, device=dev)
            if grid is not None:
                T, H, W = grid
                n_vis = N - num_prefix
                if n_vis == T * H * W:
                    frame[:, num_prefix:] = torch.arange(T, device=dev).repeat_interleave(H * W)
        vis = kind == int(Kind.VISUAL)
        patch = torch.full((B, N), -1, dtype=torch.long, device=dev)
        running = vis.long().cumsum(1) - 1
        if grid is not None:
            running = running % (grid[1] * grid[2])
        patch = torch.where(vis, running, patch)
        source = None
        if track_source:
            source = torch.eye(N, device=dev, dtype=x.dtype if x.is_floating_point() else torch.float32)
            source = source.expand(B, N, N).clone()
        return cls(x=x, pos=pos, size=torch.ones(B, N, device=dev, dtype=torch.float32), kind=kind,
                   frame=frame, grid=tuple(grid) if grid is not None else None, source=source, order=order,
                   patch=patch, signals=Signals(size_hint=N), num_protected=num_protected)

    def with_x(self, x: Tensor, **kw) -> "TokenStream":
        """The same bookkeeping over new features (same tokens)."""
        if x.shape[:2] != self.pos.shape:
            raise ValueError(f"stream has {tuple(self.pos.shape)} tokens, features have {tuple(x.shape[:2])}")
        return _evolve(self, x=x, **kw)

    # -- queries ------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    @property
    def visual(self) -> Tensor:
        """(B, N) bool: tokens a reducer may remove."""
        m = self.kind == int(Kind.VISUAL)
        return m if self.valid is None else m & self.valid

    @property
    def protected(self) -> Tensor:
        return self.kind != int(Kind.VISUAL)

    def num_visual(self) -> Tensor:
        """(B,) number of visual tokens per sample."""
        return self.visual.sum(1)

    def host_num_visual(self) -> int | None:
        """The visual tokens per sample, when every sample has the same number and it is known on
        the host (a stream that began with `num_prefix` protected tokens and all others visual,
        as a ViT's does), else None. Reducers use it to plan without reading counts back from
        the device."""
        if self.num_protected is None or self.valid is not None:
            return None
        return self.num_tokens - self.num_protected

    def host_budget(self, keep: int | float) -> int | None:
        """`budget(keep)` as an int when `host_num_visual()` is known, else None."""
        nv = self.host_num_visual()
        return None if nv is None else keep_count(nv, keep)

    def budget(self, keep: int | float) -> Tensor:
        """(B,) long: a `keep` budget (an int count, or a float fraction in (0, 1]) resolved per
        sample against that sample's own number of visual tokens (rounded; at most that number),
        so a sample keeps the same count in any batch."""
        _check_keep(keep)
        nv = self.num_visual()
        # a count beyond any sequence (even beyond int64) keeps everything
        k = torch.round(nv.double() * keep).long() if isinstance(keep, float) else \
            torch.full_like(nv, min(int(keep), 2 ** 62))
        return torch.minimum(k.clamp(min=0), nv)

    def prune_budget(self, keep: int | float):
        """The `keep` budget a pruning reducer applies: an int when `host_num_visual()` is known
        (nothing read back from the device), else `budget(keep)`, the (B,) counts; None when every
        sample would keep all its visual tokens (nothing to prune)."""
        k = self.host_budget(keep)
        if k is not None:
            return None if k >= self.host_num_visual() else k
        k = self.budget(keep)
        return None if bool((k >= self.num_visual()).all()) else k

    def signal(self, name: str, layer: int | None = None) -> Tensor:
        """A captured signal for the current tokens (layer None = this site's own layer)."""
        return self.signals.get(name, self.own_layer if layer is None else layer, self.pos)

    def state(self) -> "TokenStream":
        """Everything but the features (kept by adapters between sites)."""
        return _evolve(self, x=None)


@dataclass
class Plan:
    """What a reducer decided: which current tokens survive and, for merging, where the others go.

    keep:   (B, K) indices into the current tokens, in the reducer's order.
    assign: (B, N) the kept slot (0..K-1) each current token folds into, -1 = dropped. None =
            pure pruning. A kept token always folds into its own slot.
    weight: (B, N) merge weights; None = token sizes (size-weighted mean, as ToMe).
    normalize: divide each merged slot by the sum of its weights (a mean) or not (a sum).
    valid:  (B, K) for ragged plans (per-sample counts differ); padding slots are False.
    size_scale: (B, K) optional factor on the survivors' sizes. Where an adapter turns sizes into
            attention logits (proportional attention), a fractional size is a soft mask: a
            trainable reducer can keep every token and still learn which ones matter.
    checked: the producer guarantees what apply_plan would otherwise check and enforce (keep in
            range and unique, assign in -1..K-1 with each kept token folding into its own slot,
            every protected token kept). Built-in helpers set it; each check costs kernel
            launches on an accelerator (and a sync on the CPU), which a GPU too fast for its host
            pays in time.
    ordered: the stream order rule ("prefix" or "sequence") `keep` already follows, so
            apply_plan need not sort it; None = unknown.
    merged: (B, M) the current tokens that fold into another token's slot, when the producer
            knows them (ToMe's r sources): every token neither kept nor listed is dropped. The
            merge then reads the K kept and M merged tokens alone instead of summing all N
            into K slots (less memory traffic, which bounds a merge on a GPU).
    """

    keep: Tensor
    assign: Tensor | None = None
    weight: Tensor | None = None
    normalize: bool = True
    valid: Tensor | None = None
    size_scale: Tensor | None = None
    checked: bool = False
    ordered: str | None = None
    merged: Tensor | None = None

    @classmethod
    def keep_all(cls, stream: TokenStream) -> "Plan":
        B, N = stream.pos.shape
        return cls(keep=torch.arange(N, device=stream.pos.device).expand(B, N))

    @classmethod
    def from_mask(cls, mask: Tensor, count: int | None = None) -> "Plan":
        """Keep the True tokens of `mask` (B, N) in original order; ragged counts get padding.
        count: the number of True tokens in every row, when the caller knows it on the host (no
        device sync to read it back)."""
        if count is None:
            counts = mask.sum(1)
            K = int(counts.max()) if counts.numel() else 0
        else:
            K = count
        # stable: True tokens first, in order
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :K]
        valid = None
        if count is None and bool((counts != K).any()):
            valid = torch.arange(K, device=mask.device)[None] < counts[:, None]
        return cls(keep=order, valid=valid)

    @property
    def num_kept(self) -> int:
        return self.keep.shape[1]


def keep_count(num_visual: int, keep: int | float) -> int:
    """`TokenStream.budget(keep)` for a sample with `num_visual` visual tokens, on the host."""
    _check_keep(keep)
    if isinstance(keep, float):
        keep = fixed_under_compile(keep)  # a symbolic float under torch.compile's dynamic shapes
    # Python's round is budget()'s torch.round: half to even, on the same double product
    k = round(num_visual * keep) if isinstance(keep, float) else keep
    return max(0, min(k, num_visual))


def keep_top_visual(stream: TokenStream, scores: Tensor, k) -> Plan:
    """Keep the `k` highest-scoring visual tokens of each sample (k: int or (B,) counts) plus
    every non-visual token, in original order. Per-sample counts may differ (ragged plan).
    An int k on a stream whose counts are known on the host (`host_num_visual`) reads nothing
    back from the device."""
    vis = stream.visual
    B, N = vis.shape
    nv = stream.host_num_visual()
    host_k = max(0, min(k, nv)) if isinstance(k, int) and nv is not None else None
    # a visual token scored -inf still ranks before every non-visual one (exactly k are chosen)
    s = torch.where(vis, scores.float().clamp(min=torch.finfo(torch.float32).min), float("-inf"))
    order = torch.argsort(s, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(B, N))
    if host_k is not None:  # a Python int (no host-to-device copy); every row keeps its leading
        # protected tokens and host_k visual ones, ascending
        plan = Plan.from_mask(~vis | (vis & (rank < host_k)), count=stream.num_protected + host_k)
        plan.ordered = stream.order
    else:
        k = torch.as_tensor(k, device=scores.device).expand(B) if not torch.is_tensor(k) or k.dim() == 0 else k
        plan = Plan.from_mask(~vis | (vis & (rank < k.to(rank.device)[:, None])))
    plan.checked = True  # unique in-range indices; every non-visual token kept
    return plan


def _sorted_on_host(key: Tensor) -> bool:
    """Whether each row of `key` is already ascending, asked only where reading it back is free:
    on the CPU, outside torch.compile (a value read breaks its graph). Elsewhere False, and the
    caller's stable sort is an identity on sorted keys."""
    return (key.device.type == "cpu" and not torch.compiler.is_compiling()
            and bool((key[:, 1:] >= key[:, :-1]).all()))


def _order_permutation(stream: TokenStream, plan: Plan) -> Tensor | None:
    """Permutation of the plan's slots that realises the stream's order rule (None = as is)."""
    keep = plan.keep
    if stream.order == "sequence":
        key = keep.clone()
        if plan.valid is not None:
            key = key.masked_fill(~plan.valid, torch.iinfo(key.dtype).max)
        if _sorted_on_host(key):
            return None
        return torch.argsort(key, dim=1, stable=True)
    # prefix: protected tokens first in their original relative order (a ViT reads CLS and the
    # distillation token by index), then the visual tokens in the reducer's order
    N = stream.pos.shape[1]
    K = keep.shape[1]
    kind = stream.kind.gather(1, keep)
    slot = torch.arange(K, device=keep.device).expand_as(keep)
    key = torch.where(kind == int(Kind.VISUAL), N + slot, keep)
    if plan.valid is not None:
        key = key.masked_fill(~plan.valid, 2 * N + K)
    if _sorted_on_host(key):
        return None
    return torch.argsort(key, dim=1, stable=True)


def apply_plan(stream: TokenStream, plan: Plan) -> tuple[TokenStream, Plan]:
    """Apply `plan` to `stream`. Returns the new stream and the plan as applied (its `keep`
    re-ordered by the stream's order rule), so adapters can apply the same indices to their
    side tensors."""
    B, N = stream.pos.shape
    keep = plan.keep
    if keep.dim() != 2 or keep.shape[0] != B:
        raise ValueError(f"plan.keep must be (B={B}, K), got {tuple(keep.shape)}")
    # Checks: with clear messages on the CPU; on an accelerator asynchronous asserts (no sync).
    on_cpu = keep.device.type == "cpu"
    checked = plan.checked
    if keep.numel() and not checked:
        in_range = (keep.min() >= 0) & (keep.max() < N)
        if on_cpu and not bool(in_range):
            raise ValueError(f"plan.keep indices must lie in [0, {N})")
        elif not on_cpu:
            torch._assert_async(in_range, "tokenreduce: plan.keep indices out of range")
    keep = keep.to(torch.long)
    if keep.shape[1] > 1 and not checked:
        # a token kept twice would be duplicated and its size counted twice (sizes must sum to
        # the original count); padding slots of a ragged plan are left out of the check
        probe = keep if plan.valid is None else torch.where(
            plan.valid, keep, N + torch.arange(keep.shape[1], device=keep.device))
        srt = probe.sort(dim=1).values
        unique = (srt[:, 1:] != srt[:, :-1]).all()
        if on_cpu and not bool(unique):
            raise ValueError("plan.keep must not name a token twice (each kept token is one slot; merging "
                             "goes through plan.assign)")
        elif not on_cpu:
            torch._assert_async(unique, "tokenreduce: plan.keep names a token twice")
    assign = plan.assign
    if assign is not None:
        if assign.shape != (B, N):
            raise ValueError(f"plan.assign must be (B={B}, N={N}), got {tuple(assign.shape)}")
        assign = assign.to(torch.long)
    if assign is not None and not checked:
        assign = assign.clone()
        K = keep.shape[1]
        outside = ((assign < -1) | (assign >= K)).any()
        if on_cpu and bool(outside):
            raise ValueError(f"plan.assign names slots outside -1..{K - 1}: each token folds into a kept token's "
                             f"slot (0..{K - 1}, the order of plan.keep) or is dropped (-1)")
        elif not on_cpu:
            torch._assert_async(~outside, "tokenreduce: plan.assign names a slot outside -1..K-1")
        # a kept token always folds into its own slot (padding slots of a ragged plan claim nothing)
        src = torch.arange(keep.shape[1], device=keep.device).expand(B, -1)
        if plan.valid is not None:
            src = torch.where(plan.valid, src, assign.gather(1, keep))
        assign.scatter_(1, keep, src)

    # Protected tokens are never removed.
    if stream.num_protected != 0 and not checked:
        kept = torch.zeros(B, N, dtype=torch.bool, device=keep.device)
        kept.scatter_(1, keep, plan.valid if plan.valid is not None else True)
        lost = stream.protected & ~kept
        if stream.valid is not None:
            lost &= stream.valid
        if on_cpu and bool(lost.any()):
            raise ValueError(f"plan at {stream.site or 'site'} removes {int(lost.sum())} protected token(s) "
                             "(CLS, registers, text); reducers may only remove visual tokens")
        elif not on_cpu:
            torch._assert_async(~lost.any(), "tokenreduce: a plan removed a protected token")

    plan = _evolve(plan, keep=keep, assign=assign)
    perm = None if plan.ordered == stream.order else _order_permutation(stream, plan)
    if perm is not None:
        keep = keep.gather(1, perm)
        valid = plan.valid.gather(1, perm) if plan.valid is not None else None
        if assign is not None:
            inv = torch.argsort(perm, dim=1)  # old slot -> new slot
            assign = torch.where(assign >= 0, inv.gather(1, assign.clamp(min=0)), assign)
        scale = plan.size_scale.gather(1, perm) if plan.size_scale is not None else None
        plan = _evolve(plan, keep=keep, assign=assign, valid=valid, size_scale=scale, ordered=stream.order)

    K = keep.shape[1]
    if assign is None:
        x = gather_tokens(stream.x, keep)
        size = stream.size.gather(1, keep)
        source = gather_tokens(stream.source, keep) if stream.source is not None else None
    elif plan.merged is not None:  # each kept token, plus the listed ones folded into their slots
        merged = plan.merged.to(torch.long)
        dst = assign.gather(1, merged)
        w = stream.size if plan.weight is None else plan.weight.to(torch.float32)  # merge weights
        wk, wm = w.gather(1, keep), w.gather(1, merged)
        ft = torch.promote_types(stream.x.dtype, torch.float32)
        sk, sm = (wk, wm) if plan.weight is None else (stream.size.gather(1, keep), stream.size.gather(1, merged))
        size = sk.scatter_add(1, dst, sm)
        x = gather_tokens(stream.x, keep)
        at_dst = dst[..., None].expand(-1, -1, x.shape[-1])
        if plan.normalize:
            # a slot's weighted mean is its token plus each member's weighted difference,
            # x_d + sum_s w_s / W_d (x_s - x_d), W_d the slot's total weight: only the M
            # members are read in float32; the slots nothing merges into are a copy
            # (half inputs: the differences are rounded once more than by a float32 mean, within
            # an ulp; float64 stays float64)
            wsum = size if plan.weight is None else wk.scatter_add(1, dst, wm)
            coef = wm.to(ft) / wsum.gather(1, dst).to(ft).clamp(min=1e-12)
            diff = gather_tokens(stream.x, merged).to(ft) - x.gather(1, at_dst).to(ft)
            x = x.scatter_add(1, at_dst, (diff * coef[..., None]).to(x.dtype))
        else:
            x = (x.to(ft) * wk[..., None]).scatter_add(1, at_dst, gather_tokens(stream.x, merged).to(ft) * wm[..., None])
            x = x.to(stream.x.dtype)
        source = None
        if stream.source is not None:
            source = gather_tokens(stream.source, keep).scatter_add(
                1, dst[..., None].expand(-1, -1, stream.source.shape[-1]), gather_tokens(stream.source, merged))
    else:
        w = stream.size if plan.weight is None else plan.weight.to(torch.float32)
        slot = torch.where(assign >= 0, assign, torch.full_like(assign, K))  # K = trash slot
        # at least float32 (half inputs are summed in float32), float64 stays float64
        wx = stream.x.to(torch.promote_types(stream.x.dtype, torch.float32)) * w[..., None]
        x = torch.zeros(B, K + 1, stream.x.shape[-1], device=wx.device, dtype=wx.dtype)
        x.scatter_add_(1, slot[..., None].expand_as(wx), wx)
        size = torch.zeros(B, K + 1, device=wx.device, dtype=torch.float32).scatter_add_(1, slot, stream.size)
        if plan.normalize:
            wsum = size if plan.weight is None else \
                torch.zeros(B, K + 1, device=wx.device, dtype=torch.float32).scatter_add_(1, slot, w)
            x = x / wsum[..., None].clamp(min=1e-12)
        x = x[:, :K].to(stream.x.dtype)
        size = size[:, :K]
        source = None
        if stream.source is not None:
            src = torch.zeros(B, K + 1, stream.source.shape[-1], device=wx.device, dtype=stream.source.dtype)
            src.scatter_add_(1, slot[..., None].expand_as(stream.source), stream.source)
            source = src[:, :K]
    if plan.size_scale is not None:
        size = size * plan.size_scale
    out = _evolve(
        stream, x=x, pos=stream.pos.gather(1, keep), size=size, kind=stream.kind.gather(1, keep),
        frame=stream.frame.gather(1, keep), source=source,
        patch=stream.patch.gather(1, keep) if stream.patch is not None else None,
        item=stream.item.gather(1, keep) if stream.item is not None else None,
        valid=(plan.valid if stream.valid is None else
               (stream.valid.gather(1, keep) & plan.valid if plan.valid is not None else stream.valid.gather(1, keep))),
    )
    return out, plan
