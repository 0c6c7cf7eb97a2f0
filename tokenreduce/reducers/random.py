"""Random pruning baseline."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PolicyError
from ..registry import register_reducer
from ..stream import Plan, TokenStream, keep_top_visual
from .base import Reducer, check_budget


@register_reducer
@dataclass
class RandomPrune(Reducer):
    """Random token pruning: the control every score-based method must beat at the same budget.

    Keeps `keep` visual tokens drawn uniformly at random, in original order. The draw depends
    only on `seed`, the site and each token's rank among the visual tokens of its sample, so the
    same input gives the same output, alone or inside any (padded) batch.
    """

    name = "random"
    summary = "keep a random subset of visual tokens (baseline)"
    paper = "baseline (no paper)"
    site_families = ("vision.block", "vision.layer", "vision.out", "projector.out", "llm.layer")

    keep: object = 0.5
    seed: int = 0

    def __post_init__(self):
        check_budget(self.name, "keep", self.keep)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise PolicyError(f"random: seed must be an int, got {self.seed!r}")

    def plan(self, stream: TokenStream) -> Plan | None:
        k = stream.budget(self.keep)
        if k >= int(stream.num_visual().max()):
            return None
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + (stream.layer or 0) * 7919 + len(stream.site))
        # one draw indexed by each token's rank among the visual tokens of its sample: the same
        # tokens survive whatever the padding or the batch around them
        table = torch.rand(stream.num_tokens, generator=g).to(stream.x.device)
        rank = (stream.visual.long().cumsum(1) - 1).clamp(min=0)
        scores = table[rank]
        return keep_top_visual(stream, scores, k)
