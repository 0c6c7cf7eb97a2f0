"""FastV: prune image tokens inside the LLM by the last token's attention."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_reducer
from ..stream import Plan, TokenStream, keep_top_visual
from .base import Needs, Reducer, SiteInfo, check_budget, check_choice, check_fraction


@register_reducer
@dataclass
class FastV(Reducer):
    """An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for
    Large Vision-Language Models (FastV). Chen et al., ECCV 2024, arXiv:2403.06764.
    Reference: pkunlp-icler/FastV (modeling_llama.py, "inplace" mode).

    Placed at `llm.layer.K` (paper: K=2): take layer K-1's attention of the last token, averaged
    over heads, over the image tokens; keep the top round(n * (1 - ratio)) image tokens and every
    text token. The last token's row is what the reference code ranks by; the paper's text
    describes the average attention each token receives from all others (FastV issues #14, #44,
    #48), which keeps a different set. Survivors keep their original positions (position_ids =
    kept indices). The row is computed next to the model's fused attention, not from an eager
    attention map. As in the reference's KV-cache variant, pruning happens once at prefill;
    decode steps see that subset.
    `keep` (a count or a fraction of the image tokens) overrides `ratio` when given.
    `attended="least"` keeps the LEAST-attended tokens instead: not the paper's method but its
    ablation control, showing how much the attention ranking is worth on a given model.
    """

    name = "fastv"
    summary = "drop the image tokens the last token attends to least at LLM layer K (K=2, R=50%)"
    paper = "Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024 (arXiv:2403.06764)"
    site_families = ("llm.layer",)

    ratio: float = 0.5
    keep: object = None
    attended: str = "most"

    def __post_init__(self):
        check_fraction(self.name, "ratio", self.ratio, 0.0, 1.0, hi_open=True)
        check_budget(self.name, "keep", self.keep, allow_none=True)
        check_choice(self.name, "attended", self.attended, ("most", "least"))

    def needs(self, site: SiteInfo) -> Needs:
        return Needs(signals={"last_query_attn": (None,)})

    def kept_count(self, n_visual: torch.Tensor) -> torch.Tensor:
        if self.keep is None:
            return torch.round(n_visual.double() * (1.0 - self.ratio)).long()
        if isinstance(self.keep, float):
            return torch.round(n_visual.double() * self.keep).long()
        return n_visual.clamp(max=int(self.keep))

    def plan(self, stream: TokenStream) -> Plan | None:
        nv = stream.num_visual()
        k = self.kept_count(nv)
        if bool((k >= nv).all()):
            return None
        scores = stream.signal("last_query_attn")
        return keep_top_visual(stream, scores if self.attended == "most" else -scores, k)
