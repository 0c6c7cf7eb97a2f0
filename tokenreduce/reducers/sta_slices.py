"""Structured STA: drop whole temporal slices by semantic-aware temporal accumulation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import PolicyError
from ..registry import register_reducer
from ..stream import Plan, TokenStream, gather_tokens
from .base import Reducer
from .sta import group_tokens, minmax


@register_reducer
@dataclass
class STASlices(Reducer):
    """Structured STA for windowed video transformers (VideoSwin): removes whole temporal slices.

    Paper: Ding et al., Prune Spatio-temporal Tokens by Semantic-aware Temporal Accumulation,
    ICCV 2023 (arXiv:2308.04549). The paper applies STA to VideoSwin too, but its VideoSwin code
    is not released and the adaptation is not described in retrievable detail: this reducer is
    OUR formulation of "the same temporal-accumulation idea" at the granularity VideoSwin's
    shifted-window attention can accept (a dense (T, H, W) grid): whole temporal slices.

    At a site whose tokens form S temporal slices of n tokens (VideoSwin `stage.{s}`; also
    usable at a video ViT's `vision.layer.{i}`):
      * metric m = L2-normalised token features (the stage input, each slice average-pooled to
        at most `pool` x `pool`; keys are not exposed by VideoSwin's windowed attention without
        recomputing it); semantic a = L1 norm of each (pooled) token, min-max normalised over
        the WHOLE clip so slices can be compared;
      * slices are visited in time order; slice 0 is the anchor (never dropped: nothing
        precedes it). For slice t >= 1, with C = m_t . m_{t-1}^T (cosines) the STA transport
        M = softmax over the CURRENT-slice axis of C carries the previous slice's accumulated
        mass w (uniform 1/n for the anchor, else the previous slice's normalised s_agg) to the
        current tokens: P_ij = M_ij * w_j; token accumulation s_agg_i = sum_j P_ij (as STA);
      * slice score R_t = sum_ij P_ij * C_ij * (1 - a_t,i): the expected similarity of the
        mass that reappears in slice t, counted on semantically weak tokens. (A slice-level
        sum of STA's token score alone would be constant, because the softmax columns sum
        to one; weighting by the similarity makes slices comparable.) High R_t = a seen,
        unimportant slice;
      * the `r` slices with the highest R_t are removed; the rest stay in time order.
    The accumulation runs over consecutive slices as they arrive (no re-linking after a
    drop), every sample drops the same number of slices, possibly different ones.

    r: slices removed at this site: an int, or a float in (0, 1) as a fraction of the
    slices arriving (rounded); at least one slice always stays.
    pool: the scores are computed on each slice average-pooled to at most pool x pool tokens
    (default 14, ViT-B's 14x14 grid): the transport is quadratic in the tokens per slice, and at
    VideoSwin's first stage (56x56 per slice at 224 px) it would cost as much as a block.
    0 scores every token. Pooling needs complete slices in a known (H, W) grid; otherwise every
    token is scored.
    """

    name = "sta_slices"
    summary = "drop whole temporal slices by semantic-aware temporal accumulation (VideoSwin)"
    paper = "Ding et al., Prune Spatio-temporal Tokens by Semantic-aware Temporal Accumulation, ICCV 2023 (arXiv:2308.04549); slice formulation ours"
    site_families = ("stage", "vision.layer")
    structured = True

    r: object = 2
    pool: int = 14

    def __post_init__(self):
        ok = (isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 0) or \
            (isinstance(self.r, float) and 0.0 < self.r < 1.0)
        if not ok:
            raise PolicyError(f"sta_slices: r must be an int >= 0 (slices removed) or a float in (0, 1) "
                              f"(fraction of the slices removed), got {self.r!r}")
        if isinstance(self.pool, bool) or not isinstance(self.pool, int) or self.pool < 0:
            raise PolicyError(f"sta_slices: pool must be an int >= 0 (0 = score every token), got {self.pool!r}")

    def scores(self, stream: TokenStream):
        """(order (B, S*n), protected (B, P), n, R (B, S)): slice scores, -inf for the anchor."""
        order, prot, n = group_tokens(stream, 1)
        B = stream.batch
        S = order.shape[1] // n
        x = gather_tokens(stream.x, order).float().reshape(B, S, n, -1)
        x = self._pooled(stream, order, x)
        n_s = x.shape[2]
        m = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        a = minmax(x.abs().sum(-1).reshape(B, S * n_s)).reshape(B, S, n_s)
        R = torch.full((B, S), float("-inf"), device=x.device)
        w = torch.full((B, n_s), 1.0 / n_s, device=x.device)
        for t in range(1, S):
            C = m[:, t] @ m[:, t - 1].transpose(-1, -2)  # (B, n_cur, n_prev)
            P = C.softmax(dim=1) * w[:, None, :]
            R[:, t] = (P * C * (1 - a[:, t])[..., None]).sum(dim=(1, 2))
            s_agg = P.sum(-1)
            w = s_agg / s_agg.sum(-1, keepdim=True).clamp(min=1e-12)
        return order, prot, n, R

    def _pooled(self, stream: TokenStream, order, x):
        """(B, S, n, C) slice tokens -> (B, S, n', C) average-pooled to at most pool x pool."""
        if not self.pool or stream.grid is None or stream.patch is None:
            return x
        _, H, W = stream.grid
        B, S, n, C = x.shape
        if n != H * W or (H <= self.pool and W <= self.pool):
            return x
        # place each token at its spatial position inside its slice, then pool
        patch = stream.patch.gather(1, order).reshape(B, S, n)
        grid = torch.zeros_like(x).scatter_(2, patch[..., None].expand_as(x), x)
        grid = grid.reshape(B * S, H, W, C).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(grid, (min(H, self.pool), min(W, self.pool)))
        return pooled.flatten(2).transpose(1, 2).reshape(B, S, -1, C)

    def plan(self, stream: TokenStream) -> Plan | None:
        if self.r == 0:
            return None
        order, prot, n, R = self.scores(stream)
        B, S = R.shape
        r = int(round(self.r * S)) if isinstance(self.r, float) else self.r
        r = min(r, S - 1)
        if r <= 0:
            return None
        drop = R.topk(r, dim=1).indices
        keep_slices = torch.ones(B, S, dtype=torch.bool, device=R.device)
        keep_slices.scatter_(1, drop, False)
        kept = torch.nonzero(keep_slices)[:, 1].reshape(B, S - r)  # time order
        grouped = order.reshape(B, S, n)
        tokens = grouped.gather(1, kept[..., None].expand(B, S - r, n)).reshape(B, -1)
        return Plan(keep=torch.cat([prot, tokens], dim=1))
