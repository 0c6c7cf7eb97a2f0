"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PolicyError
from ..registry import register_reducer
from ..stream import Plan, TokenStream
from ._packing import (check_count, check_layer, merge_inputs, pack, protected_indices, resolve_layer, stream_site,
                       visual_indices)
from .base import Needs, Reducer, SiteInfo, check_budget

#: the reference's split of a budget: 54 dominant + 10 contextual for 64 tokens (also 108 + 20,
#: 162 + 30): dominant = round(keep * 54 / 64)
DOMINANT_SHARE = 54 / 64


@register_reducer
@dataclass
class VisionZip(Reducer):
    """VisionZip: Longer is Better but Not Necessary in Vision Language Models.
    Yang et al., CVPR 2025, arXiv:2412.04467. Reference: dvlab-research/VisionZip
    (visionzip/clip_encoder.py, utils.py; commit 3151f6d).

    At `vision.out`, from the vision tower's layer that produced the features (LLaVA-1.5: layer
    -2, as the reference):

    1. Dominant tokens: the `dominant` tokens with the highest [CLS]->token attention. The
       reference sums the attention over heads; we read the head-averaged row, which ranks the
       tokens identically (the sum is H times the mean).
    2. Contextual tokens: among the remaining tokens (in sequence order) `contextual` targets are
       taken at a uniform index stride, step = max(1, R // contextual); every other remaining
       token is assigned to the target whose key (averaged over heads, the reference's
       "metric") is most cosine-similar. Contextual token = target + mean of its assigned
       tokens (the reference adds the mean of the assigned tokens to the target; it is not a
       mean that includes the target). Expressed as a merge plan with weight 1 for the target
       and 1/count for each assigned token, without normalisation (sizes are summed).
    3. Output order [dominant in sequence order, contextual in target order]; protected tokens
       first (the site's order rule).

    The [CLS] token. The reference passes the CLS *feature* to the LLM as one of the dominant
    tokens (`dominant=54` means CLS + 53 patches). Here every protected token the stream
    carries (CLS, registers: e.g. a plain ViT's `vision.out`, or LLaVA with
    vision_feature_select_strategy="full") is kept and counted as one of the `dominant` tokens,
    exactly like the reference. LLaVA-1.5's "default" strategy drops CLS before `vision.out`,
    so there the whole dominant budget goes to patches: `dominant=54` keeps 54 patches and the
    output holds exactly `dominant + contextual` tokens, as the reference's does (its CLS slot
    becomes one more patch).

    Parameters: `dominant`, `contextual` (defaults 54 / 10: the reference's 64-token setting),
    or `keep` (an int count or a fraction of the visual tokens), split in the reference's
    54:10 ratio (dominant = round(keep * 27/32): 64 -> 54+10, 128 -> 108+20, 192 -> 162+30).
    `layer`: the tower layer for the attention and the keys (None = the feature layer of the
    site; negatives count from the end).
    The reference's optional projector fine-tune is not part of this (training-free) reducer.
    """

    name = "visionzip"
    summary = "keep the top-[CLS]-attention tokens and merge the rest into a few contextual tokens"
    paper = "Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language Models, CVPR 2025 (arXiv:2412.04467)"
    site_families = ("vision.out",)

    dominant: int = 54
    contextual: int = 10
    keep: object = None
    layer: object = None
    trace_source: bool = False  # track which original patches each kept token holds (visualisation)

    def __post_init__(self):
        check_count(self.name, "dominant", self.dominant)
        check_count(self.name, "contextual", self.contextual)
        check_budget(self.name, "keep", self.keep, allow_none=True)
        check_layer(self.name, self.layer)
        if self.keep is not None and (self.dominant, self.contextual) != (54, 10):
            raise PolicyError("visionzip: give either keep (split 54:10 into dominant + contextual) or "
                              f"dominant / contextual, not both (got keep={self.keep!r}, dominant={self.dominant}, "
                              f"contextual={self.contextual})")
        if self.keep is None and self.dominant + self.contextual == 0:
            raise PolicyError("visionzip: dominant + contextual must be >= 1")

    # -- budget ---------------------------------------------------------------------------------
    def split(self, n_visual: int) -> tuple[int, int]:
        """(dominant, contextual) for a sample with `n_visual` removable tokens."""
        if self.keep is None:
            return self.dominant, self.contextual
        if isinstance(self.keep, float):
            total = int(round(self.keep * n_visual))
        else:
            total = int(self.keep)
        dom = int(round(total * DOMINANT_SHARE))
        return dom, total - dom

    def score_layer(self, site: SiteInfo | None, stream: TokenStream | None = None) -> int:
        return resolve_layer(self.name, self.layer, site, stream, default="own")

    def needs(self, site: SiteInfo) -> Needs:
        layer = self.score_layer(site)
        return Needs(signals={"cls_attn": (layer,), "keys": (layer,)}, source=self.trace_source)

    # -- plan -----------------------------------------------------------------------------------
    def plan(self, stream: TokenStream) -> Plan | None:
        layer = self.score_layer(stream_site(stream), stream)
        attn, keys, assign, weight = merge_inputs(stream, layer)
        B, N = stream.pos.shape
        dev = stream.pos.device
        keeps, changed = [], False
        for b in range(B):
            vis = visual_indices(stream, b)
            prot = protected_indices(stream, b)
            n_vis = len(vis)
            dom, ctx = self.split(n_vis)
            n_dom = max(0, min(dom - len(prot), n_vis))  # protected tokens (CLS) count as dominant
            if n_dom + ctx >= n_vis:
                kb = torch.cat([prot, vis])
                keeps.append(kb)
                continue
            changed = True
            # 1. dominant: top attention among the visual tokens, in sequence order
            order = torch.argsort(attn[b, vis], descending=True, stable=True)
            dominant = vis[order[:n_dom]].sort().values
            rest = vis[order[n_dom:]].sort().values       # remaining tokens, sequence order
            # 2. contextual: uniform-stride targets, the others folded into the nearest target
            R = len(rest)
            if ctx > 0:
                step = max(1, R // ctx)
                t_local = torch.arange(0, R, step, device=dev)[:ctx]
                is_t = torch.zeros(R, dtype=torch.bool, device=dev)
                is_t[t_local] = True
                targets, others = rest[is_t], rest[~is_t]
                m = keys[b, rest]
                m = m / m.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                if len(others):
                    sim = m[~is_t] @ m[is_t].T                 # (others, targets)
                    choice = sim.argmax(dim=1)
                    counts = torch.bincount(choice, minlength=len(targets)).clamp(min=1)
                    slot0 = len(prot) + n_dom
                    assign[b, others] = slot0 + choice
                    weight[b, others] = 1.0 / counts[choice].float()
            else:
                targets = rest[:0]
            kb = torch.cat([prot, dominant, targets])
            keeps.append(kb)
        if not changed:
            return None
        for b, kb in enumerate(keeps):  # kept tokens fold into their own slot with weight 1
            assign[b, kb] = torch.arange(len(kb), device=dev)
        return pack(stream, keeps, assign=assign, weight=weight, normalize=False)
