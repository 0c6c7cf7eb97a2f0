"""Spatially uniform pruning baseline."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..ops import grid_lattice, nearest_unique
from ..registry import register_reducer
from ..stream import Plan, TokenStream, keep_count
from .base import Reducer, check_budget


@register_reducer
@dataclass
class UniformPrune(Reducer):
    """Spatially uniform pruning: keep `keep` visual tokens spread evenly over each frame's grid.

    The budget is split evenly over frames (each image of a prompt, tile or video frame is one);
    inside a frame the survivors are the tokens nearest to a regular lattice of that many points
    (exactly a strided grid when all tokens are still there). Without a known grid, tokens are
    taken at evenly spaced indices. Original order.
    """

    name = "uniform"
    summary = "keep visual tokens on an even spatial lattice (baseline)"
    paper = "baseline (no paper)"
    site_families = ("vision.block", "vision.layer", "vision.out", "projector.out", "llm.layer")

    keep: object = 0.5

    def __post_init__(self):
        check_budget(self.name, "keep", self.keep)

    def plan(self, stream: TokenStream) -> Plan | None:
        whole = _whole_frames(stream)
        if whole is not None:
            return self._plan_whole_frames(stream, *whole)
        k = stream.prune_budget(self.keep)
        if k is None:
            return None
        mask = ~stream.visual  # every non-visual token, plus each sample's own k lattice picks
        for b, kb in enumerate([k] * stream.batch if isinstance(k, int) else k.tolist()):
            mask[b, self._pick(stream, b, kb)] = True
        return Plan.from_mask(mask)

    def _plan_whole_frames(self, stream: TokenStream, grid, nv: int) -> Plan | None:
        """Every row holds every token of every frame of one grid: each frame keeps the lattice
        picks of its share of the budget, the same patches in every row, so the plan is a table
        lookup on (frame, patch) with a count known on the host (nothing read back per frame)."""
        k = keep_count(nv, self.keep)
        if k >= nv:
            return None
        T, H, W = grid
        vis = stream.visual
        table = torch.zeros(T * H * W, dtype=torch.bool, device=vis.device)
        table[torch.tensor(_lattice_picks(T, H, W, k), dtype=torch.long, device=vis.device)] = True
        picked = table.view(T, H * W)[stream.frame.clamp(min=0), stream.patch.clamp(min=0)]
        plan = Plan.from_mask(~vis | (vis & picked), count=stream.pos.shape[1] - nv + k)
        plan.checked = True  # unique in-range indices, every non-visual token kept
        return plan

    @staticmethod
    def _pick(stream: TokenStream, b: int, k: int) -> torch.Tensor:
        vis = torch.nonzero(stream.visual[b]).squeeze(1)
        dev = vis.device
        if k <= 0 or len(vis) == 0:  # e.g. a text-only sample in a batch with images
            return vis[:0]
        grid = stream.grid_of(b)
        if grid is None or stream.patch is None:
            sel = torch.linspace(0, len(vis) - 1, k).round().long().to(dev)
            return vis[sel].sort().values
        _, H, W = grid
        # one plane per frame of each image / video of the row (the LLM's stream may hold several,
        # each with its own frame 0)
        frames = stream.frame[b, vis]
        if stream.item is not None:
            frames = stream.item[b, vis] * (int(frames.max()) + 2) + frames
        uniq = frames.unique(sorted=True)
        share = [k // len(uniq) + (1 if i < k % len(uniq) else 0) for i in range(len(uniq))]
        picked = []
        for f, kf in zip(uniq.tolist(), share):
            idx = vis[frames == f]
            kf = min(kf, len(idx))
            if kf == 0:
                continue
            if len(idx) == H * W:  # a whole frame: the lattice on the full grid, computed once
                chosen = _full_grid_choice(H, W, kf).to(dev)
                picked.append(idx[torch.isin(stream.patch[b, idx], chosen)])
                continue
            p = stream.patch[b, idx].cpu()
            coords = torch.stack([p // W, p % W], -1)
            picked.append(idx[nearest_unique(grid_lattice(H, W, kf), coords).to(dev)])
        out = torch.cat(picked) if picked else vis[:0]
        if len(out) < k:  # frames with too few tokens: top up from the rest, evenly
            rest = vis[~torch.isin(vis, out)]
            out = torch.cat([out, rest[torch.linspace(0, len(rest) - 1, k - len(out)).round().long().to(dev)]])
        return out.sort().values


def _whole_frames(stream: TokenStream):
    """((T, H, W), visual tokens per row) when every row's visual tokens are all T * H * W
    tokens of one grid (nothing removed or merged yet), else None. Known on the host for a
    ViT's stream; otherwise one count is read back (instead of several per frame)."""
    grid = stream.grid
    if grid is None or stream.row_grids is not None or stream.item is not None or stream.patch is None:
        return None
    T, H, W = grid
    nv = stream.host_num_visual()
    if nv is None:
        if stream.valid is not None:
            return None
        nv = T * H * W if bool((stream.num_visual() == T * H * W).all()) else None
    return (grid, nv) if nv == T * H * W else None


@torch.compiler.assume_constant_result  # host arithmetic on constants: torch.compile takes the result
def _lattice_picks(T: int, H: int, W: int, k: int) -> tuple:
    """Flat (frame * H * W + patch) indices of the lattice picks of whole frames: the first
    k % T frames take one token more than k // T, as the per-frame path shares the budget."""
    return _lattice_picks_cached(T, H, W, k)


@lru_cache(maxsize=256)
def _lattice_picks_cached(T: int, H: int, W: int, k: int) -> tuple:
    out = []
    for f in range(T):
        kf = k // T + (1 if f < k % T else 0)
        if kf:
            out += [f * H * W + p for p in _full_grid_choice(H, W, kf).tolist()]
    return tuple(out)


@lru_cache(maxsize=256)
def _full_grid_choice(h: int, w: int, k: int) -> torch.Tensor:
    """Patch indices (row * w + col) of the k lattice points on a complete h x w grid."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([rows.reshape(-1), cols.reshape(-1)], -1)
    return nearest_unique(grid_lattice(h, w, k), coords)
