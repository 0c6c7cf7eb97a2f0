"""VTC-CLS: [CLS] attention pruning."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PolicyError, SiteError
from ..registry import register_reducer
from ..stream import Plan, TokenStream, keep_top_visual
from .base import Needs, Reducer, SiteInfo, check_budget, check_choice

ENSEMBLES = ("sum", "mean", "max", "min")


@register_reducer
@dataclass
class VTCCLS(Reducer):
    """[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs (VTC-CLS).
    Wang et al., arXiv:2412.05819. Reference: THU-MIG/VTC-CLS (clip_encoder.py cls_token_only).

    Score each patch by the vision tower's CLS->patch attention, averaged over heads and summed
    over a range of layers (the ensemble), keep the top `keep` patches in original order.

    At `vision.out` the default range is the reference's: from `start` to the penultimate layer
    (the LLaVA feature layer), the last layer excluded. The reference's start default is 16 of
    CLIP-L's 24 layers; for other depths we scale it to round(2/3 * depth) (our choice; the
    paper does not publish per-cell start layers). Inside `vision.block.{i}` it prunes
    EViT-style from block i's own CLS row. `layers` overrides the range (negatives count from
    the end). The CLS row is recomputed from q/k next to fused attention, never from eager maps.
    `keep` defaults to 64, the smallest budget of the paper's tables (its evaluation scripts'
    command-line default, token_num, is 36).
    """

    name = "vtc_cls"
    summary = "keep the patches the [CLS] query attends to most, summed over a layer range"
    paper = "Wang et al., [CLS] Token Tells Everything Needed for Training-free Efficient MLLMs (arXiv:2412.05819)"
    site_families = ("vision.block", "vision.layer", "vision.out")

    keep: object = 64
    start: object = None
    layers: object = None
    ensemble: str = "sum"

    def __post_init__(self):
        check_budget(self.name, "keep", self.keep)
        check_choice(self.name, "ensemble", self.ensemble, ENSEMBLES)
        if self.start is not None and (isinstance(self.start, bool) or not isinstance(self.start, int)):
            raise PolicyError(f"vtc_cls: start must be an int layer index or None, got {self.start!r}")
        if self.layers is not None:
            if isinstance(self.layers, int) and not isinstance(self.layers, bool):
                self.layers = [self.layers]
            if not isinstance(self.layers, (list, tuple)) or not self.layers or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in self.layers):
                raise PolicyError(f"vtc_cls: layers must be a non-empty list of int layer indices, got {self.layers!r}")
            self.layers = list(self.layers)

    def score_layers(self, site: SiteInfo) -> tuple:
        depth = site.depth
        if self.layers is not None:
            # negative indices count from the end (-1 = the last layer); anything outside
            # -depth..depth-1 is left as given so that check_site names the valid range
            return tuple(sorted({l + depth if -depth <= l < 0 else l for l in self.layers}))
        own = site.own_layer if site.own_layer is not None else depth - 1
        if site.family != "vision.out":
            return (own,)
        last = min(own, depth - 2) if depth > 1 else own
        start = self.start if self.start is not None else round(2 * depth / 3)
        start = start + depth if -depth <= start < 0 else start
        if not 0 <= start < depth:
            raise SiteError(f"vtc_cls at {site.name!r}: start={self.start} is outside the model's layers; "
                            f"valid: {-depth}..{depth - 1}")
        return tuple(range(min(start, last), last + 1))

    def needs(self, site: SiteInfo) -> Needs:
        return Needs(signals={"cls_attn": self.score_layers(site)})

    def scores(self, stream: TokenStream, layers) -> torch.Tensor:
        rows = torch.stack([stream.signal("cls_attn", l) for l in layers])
        if self.ensemble == "sum":
            return rows.sum(0)
        if self.ensemble == "mean":
            return rows.mean(0)
        return rows.amax(0) if self.ensemble == "max" else rows.amin(0)

    def plan(self, stream: TokenStream) -> Plan | None:
        layers = self.score_layers(stream.info)
        k = stream.prune_budget(self.keep)
        if k is None:
            return None
        return keep_top_visual(stream, self.scores(stream, layers), k)
