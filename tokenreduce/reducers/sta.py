"""STA: Semantic-aware Temporal Accumulation token pruning for video ViTs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import PolicyError, SiteError
from ..registry import register_reducer
from ..stream import Plan, TokenStream, gather_tokens
from .base import Needs, Reducer, SiteInfo


def _check_r(method: str, r) -> object:
    if isinstance(r, (list, tuple)):
        if len(r) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r):
            raise PolicyError(f"{method}: r as a list must hold three ints >= 0 (one per stage), got {r!r}")
        return list(r)
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise PolicyError(f"{method}: r must be an int >= 0 (tokens removed per frame group) or a list of "
                          f"three such ints (one per stage), got {r!r}")
    return r


def paper_stage(site: SiteInfo) -> int | None:
    """The STA stage (0, 1, 2) that runs at `vision.layer.{i}`, i.e. after block i-1, or None.

    The paper's three stages follow blocks 0, depth//3 and 2*depth//3 (ViT-L: 0, 8, 16, so
    vision.layer.1, .9 and .17; ViT-B: 0, 4, 8, so vision.layer.1, .5 and .9).
    """
    if site.index is None or site.depth is None or site.index < 1:
        return None
    after = site.index - 1
    marks = (0, site.depth // 3, 2 * site.depth // 3)
    return marks.index(after) if after in marks else None


def group_tokens(stream: TokenStream, frames_per_group: int) -> tuple[Tensor, Tensor, int]:
    """Sort the visual tokens by frame group (stable, so the current order is kept inside a
    group). Returns (order (B, G*n) indices into the stream, protected indices (B, P), n).

    All checks are read back in one host-device synchronisation."""
    B, N = stream.pos.shape
    vis = stream.visual
    frame = stream.frame
    group = torch.where(vis, frame // frames_per_group, torch.full_like(frame, -1))
    order = torch.argsort(group, dim=1, stable=True)  # protected (-1) first
    g_sorted = group.gather(1, order)
    # dense rank of the visual groups per sample (frames removed earlier leave gaps in the values)
    rank = torch.zeros_like(g_sorted)
    if N > 1:
        step = (g_sorted[:, 1:] != g_sorted[:, :-1]) & (g_sorted[:, :-1] >= 0)
        rank[:, 1:] = step.long().cumsum(1)
    vis_sorted = g_sorted >= 0
    counts = torch.zeros(B, N + 1, dtype=torch.long, device=rank.device)
    counts.scatter_add_(1, torch.where(vis_sorted, rank, torch.full_like(rank, N)), torch.ones_like(rank))
    counts = counts[:, :N]
    used = counts > 0
    n_prot = (~vis).sum(1)
    big = torch.iinfo(torch.long).max
    checks = torch.stack([
        ((frame < 0) & vis).any().long(), n_prot.max(), n_prot.min(), used.sum(1).max(), used.sum(1).min(),
        counts.max(), counts.masked_fill(~used, big).min()])
    bad_frame, p_max, p_min, g_max, g_min, c_max, c_min = checks.tolist()
    if bad_frame:
        raise SiteError(f"sta at {stream.site!r}: visual tokens without a frame index; STA needs a video "
                        "token layout (T, H, W) from the adapter")
    if p_max != p_min:
        raise SiteError(f"sta at {stream.site!r}: samples carry different numbers of protected tokens")
    if g_max == 0 or g_max != g_min or c_max != c_min:
        raise SiteError(f"sta at {stream.site!r}: every group of {frames_per_group} frame(s) must hold the same "
                        f"number of tokens; got counts {counts[:, :g_max].tolist()} (did an unstructured reducer "
                        "run earlier?)")
    return order[:, p_max:], order[:, :p_max], int(c_max)


def minmax(a: Tensor, dim: int = -1, eps: float = 1e-6) -> Tensor:
    lo = a.amin(dim=dim, keepdim=True)
    hi = a.amax(dim=dim, keepdim=True)
    return (a - lo) / (hi - lo).clamp(min=eps)


@register_reducer
@dataclass
class STA(Reducer):
    """Prune Spatio-temporal Tokens by Semantic-aware Temporal Accumulation (STA).
    Ding, Zhao, Zhang, Qian, Xiong, Tian. ICCV 2023, arXiv:2308.04549.
    Reference: Mark12Ding/STA (model_vit.py, `VisionTransformer.merge`), a VideoMAE ViT.

    Runs between blocks (`vision.layer.{i}`, after the whole block) on a video ViT whose
    tokens carry a frame index. One stage with prune number r:
      * tokens are grouped by frames: stage 0 one frame per group (T groups), stage 1 two
        consecutive frames (T/2 groups, processed in REVERSE time order), stage 2 four frames
        (T/4 groups); "frame" is the tubelet slot of the ViT (VideoMAE: 8 slots of 196);
      * metric = the previous block's keys averaged over heads, L2-normalised; semantic
        factor = 1 - minmax(L1 norm of each token's features) inside its group;
      * the first processed group drops r tokens ToMe-style without merging: even tokens
        whose best cosine match among the odd tokens is highest go; order [odd, kept even
        by ascending match];
      * later groups: temporal accumulation. t=1: M = softmax over the CURRENT-frame axis of
        metric_t . metric_prev^T against ALL n tokens of the first group (incl. dropped ones),
        s_agg = row sums of M; t>=2: against the previous group's KEPT tokens, s_agg <- M @
        s_agg_prev (restricted to kept tokens, renormalised to sum 1). Score s = s_agg * (1 -
        semantic); keep the n - r LOWEST (redundant and unimportant tokens go), in ascending
        score order;
      * groups are concatenated back in time order (the reversed stage prepends).
    Token counts: groups * (n - r); VideoMAE-L r=64: 1568 -> 1056 -> 800 -> 672.

    Placement: `vision.layer.*=sta(r=32)` acts only at the paper's three stages, after blocks
    0, depth//3 and 2*depth//3 (the other layers are no-ops and capture nothing). `stage=k`
    (0, 1 or 2) instead runs stage k's grouping wherever the reducer is placed.
    r: tokens removed per group, an int or a list of three (one per stage).

    What the paper leaves open, and our choice: the grouping for T other than 8 slots is
    frames-per-group = 1, 2, 4 (so T must be divisible by the group size; T=4 gives 4, 2, 1
    groups); r is clamped to n // 2 per group (ToMe's clamp; the reference assumes r < n/2);
    scores are computed in float32 (the reference runs them in the model's dtype); a constant
    L1 norm inside a group (max = min) gives semantic factor 1 instead of a division by zero;
    protected tokens (a CLS in other video ViTs) are kept and never grouped.
    """

    name = "sta"
    summary = "prune temporally redundant, semantically weak video tokens in three stages (ViT)"
    paper = "Ding et al., Prune Spatio-temporal Tokens by Semantic-aware Temporal Accumulation, ICCV 2023 (arXiv:2308.04549)"
    site_families = ("vision.layer",)

    r: object = 32
    stage: object = None

    def __post_init__(self):
        self.r = _check_r(self.name, self.r)
        if self.stage is not None and (isinstance(self.stage, bool) or self.stage not in (0, 1, 2)):
            raise PolicyError(f"sta: stage must be None (the paper's three stages, chosen from the layer) "
                              f"or one of 0, 1, 2, got {self.stage!r}")

    def stage_at(self, site: SiteInfo) -> int | None:
        if self.stage is not None:
            return self.stage
        return paper_stage(site)

    def check_site(self, site: SiteInfo) -> None:
        if self.stage is not None and site.family == "vision.layer" and (site.index or 0) < 1:
            raise SiteError(f"sta(stage={self.stage}) at {site.name!r}: STA needs the keys of the previous block, "
                            "and nothing runs before vision.layer.0; place it at vision.layer.1 or later")
        super().check_site(site)
        if self.stage is None and site.depth is not None and site.depth < 4:
            raise SiteError(f"sta: the paper's three stages (after blocks 0, depth//3 and 2*depth//3, each before "
                            f"another block) need a ViT with >= 4 blocks (got depth {site.depth}); pass stage=0, 1 "
                            "or 2 explicitly")

    def needs(self, site: SiteInfo) -> Needs:
        if self.stage_at(site) is None:
            return Needs()
        return Needs(signals={"keys": (None,)})

    def r_at(self, stage: int) -> int:
        return self.r[stage] if isinstance(self.r, list) else self.r

    def plan(self, stream: TokenStream) -> Plan | None:
        stage = self.stage_at(stream.info)
        if stage is None:
            return None
        r = self.r_at(stage)
        if r <= 0:
            return None
        if stream.grid is None:
            raise SiteError(f"sta at {stream.site!r}: the adapter gave no (T, H, W) token grid")
        T = stream.grid[0]
        per = min(2 ** stage, T)
        if T % per:
            raise SiteError(f"sta at {stream.site!r}: stage {stage} groups {per} temporal slots (tubelets of "
                            f"frames) but the video has {T}; use a number of slots divisible by {per}, i.e. "
                            f"a frame count that is a multiple of {per} x the tubelet size (e.g. 8 or 16 frames "
                            "for VideoMAE's tubelet of 2)")
        order, prot, n = group_tokens(stream, per)
        B = stream.batch
        G = order.shape[1] // n
        r = min(r, n // 2)
        if r <= 0:
            return None
        l1 = stream.x.float().abs().sum(-1).gather(1, order).reshape(B, G, n)  # only the L1 norms are needed
        metric = gather_tokens(stream.signal("keys"), order).float().reshape(B, G, n, -1)
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        semantic = minmax(l1)  # (B, G, n)
        perm = list(range(G))[::-1] if stage == 1 else list(range(G))
        local = [None] * G  # kept indices inside each group (B, n - r)

        # first processed group: ToMe-style drop (no merge)
        g0 = perm[0]
        m0 = metric[:, g0]
        a, b = m0[:, ::2], m0[:, 1::2]
        node_max = (a @ b.transpose(-1, -2)).amax(dim=-1)  # (B, ceil(n/2))
        asc = node_max.argsort(dim=-1)  # least similar first
        dev = l1.device
        first = torch.cat([torch.arange(1, n, 2, device=dev).expand(B, -1), asc * 2], dim=1)
        local[g0] = first[:, :n - r]

        s_agg = None
        prev_kept = None
        for t in range(1, G):
            g, gp = perm[t], perm[t - 1]
            mt = metric[:, g]
            if t == 1:  # against ALL tokens of the first group, dropped ones included
                M = (mt @ m0.transpose(-1, -2)).softmax(dim=1)
                s_agg = M.sum(dim=-1, keepdim=True)  # (B, n, 1)
            else:  # against the previous group's kept tokens
                mp = gather_tokens(metric[:, gp], prev_kept)
                M = (mt @ mp.transpose(-1, -2)).softmax(dim=1)  # (B, n, n - r)
                s_agg = M @ s_agg
            s = s_agg[..., 0] * (1 - semantic[:, g])
            kept = s.topk(n - r, dim=1, largest=False).indices
            local[g] = kept
            s_agg = s_agg.gather(1, kept[..., None])
            s_agg = s_agg / s_agg.sum(dim=1, keepdim=True).clamp(min=1e-12)
            prev_kept = kept

        grouped = order.reshape(B, G, n)
        keep = torch.cat([prot] + [grouped[:, g].gather(1, local[g]) for g in range(G)], dim=1)
        return Plan(keep=keep)
