"""LLaVA-PruMerge+: adaptive [CLS]-attention pruning (IQR outliers) + spatially uniform extras,
each kept token absorbing its key-nearest neighbours weighted by attention."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PolicyError
from ..registry import register_reducer
from ..stream import Plan, TokenStream
from ._packing import (check_count, check_layer, merge_inputs, pack, protected_indices, resolve_layer,
                       stream_site, visual_indices)
from .base import Needs, Reducer, SiteInfo


def iqr_outliers(attn: torch.Tensor, whisker: float = 1.5) -> int:
    """How many values of `attn` (1-D) lie above Q3 + whisker * IQR (numpy's linear percentiles)."""
    a = attn.double()
    q1, q3 = torch.quantile(a, torch.tensor([0.25, 0.75], dtype=a.dtype, device=a.device))
    return int((a > q3 + whisker * (q3 - q1)).sum())


def uniform_extras(n: int, count: int, taken: torch.Tensor) -> torch.Tensor:
    """PruMerge+'s spatially uniform indices for `count` kept of `n` tokens, minus `taken`.

    The reference: step = int(1 / ratio), indices arange(0, 575, int(step / 3)) for 576 patches
    (the bound is n - 1, so the last patch is never an extra), skipping indices already kept.
    The stride is clamped to >= 1 (the reference fails when ratio > 1/3).
    """
    ratio = count / n
    stride = max(1, int(int(1 / ratio) / 3))
    seq = torch.arange(0, max(n - 1, 0), stride, device=taken.device)
    return seq[~torch.isin(seq, taken)]


@register_reducer
@dataclass
class PruMergePlus(Reducer):
    """LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models (the
    PruMerge+ variant). Shang, Cai, Xu, Lee, Yan. arXiv:2403.15388 (ICCV 2025).
    Reference: 42Shawn/LLaVA-PruMerge, llava/model/multimodal_encoder/clip_encoder.py,
    `token_prune_merge_advanced_plus` (if_adaptive=True).

    At `vision.out` (LLaVA-1.5: the layer -2 features, before the projector):

    1. Score every visual token by the [CLS] attention of the tower's LAST layer (`layer=-1`).
    2. Adaptive count: the number of scores above Q3 + 1.5 * IQR (`whisker`); keep that many
       top-scoring tokens (in descending score order, as the reference's topk).
    3. PruMerge+ (`plus=True`): add spatially uniform indices, stride int(int(1/ratio) / 3) with
       ratio = count / n over arange(0, n - 1), skipping indices already kept (appended in
       ascending order after the top tokens). `plus=False` gives plain LLaVA-PruMerge.
    4. Merge: each kept token finds its `knn` (32) nearest tokens by cosine of the same layer's
       keys and adds sum(attn_j * x_j) over them to itself: a weighted SUM, not a mean (the
       reference's division by the weight sum is commented out). Sizes are summed.

    Deviations (all forced by what a plan or our signals can express, or chosen for batches):
    - Attention: the reference recomputes layer 23's attention as ONE head over the full width
      (q, k from hooks on q_proj / k_proj, scale C^-0.5). We read the adapter's multi-head CLS
      row averaged over heads (computed next to fused attention). Scores, hence the IQR count,
      differ from the reference's on real checkpoints; the merge weights use the same row.
    - Keys: the neighbour search uses keys averaged over heads (the "keys" signal); the
      reference uses the full-width k_proj output.
    - Per sample: the reference computes the IQR rule over the whole batch flattened (it runs
      batch 1); here each sample gets its own count, so a batch gives a ragged plan. A sample
      with no outlier keeps its single top token (the reference divides by zero there).
    - Neighbourhoods: in the reference they overlap (a token may feed several kept tokens, and
      kept tokens feed each other, unchanged). A Plan is a partition, so here every pruned
      token folds into exactly one kept token: the most key-similar kept token that has it
      among its `knn` nearest; kept tokens do not feed each other; a pruned token in no
      kept token's neighbourhood is dropped (as in the reference, apart from step 5).
    - Step 5 of the reference appends one more token, sum(attn_j * x_j) over ALL pruned tokens
      (count + 1 tokens). Pruned tokens already fold into their kept neighbours and a plan
      cannot send a token to two slots, so this token is not produced: we output count +
      extras tokens, one fewer than the reference.
    - In a ragged batch a shorter sample gets padding slots (Plan.valid); they claim nothing,
      so every merge is exact and a batch gives each sample's batch-1 result.
    - `knn` is clamped to the number of other tokens (the reference's topk would fail).
    Inside a plain ViT (timm / HF tower `vision.out`) the adapters refuse ragged plans, so there
    the per-sample counts must agree (batch 1, as the reference runs).
    """

    name = "prumerge_plus"
    summary = "adaptive [CLS]-attention pruning (IQR) + uniform extras; kept tokens absorb their neighbours"
    paper = "Shang et al., LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models (arXiv:2403.15388)"
    site_families = ("vision.out",)

    knn: int = 32
    whisker: float = 1.5
    plus: bool = True
    layer: object = -1
    trace_source: bool = False  # track which original patches each kept token holds (visualisation)

    def __post_init__(self):
        check_count(self.name, "knn", self.knn)
        if isinstance(self.whisker, bool) or not isinstance(self.whisker, (int, float)) or self.whisker < 0:
            raise PolicyError(f"prumerge_plus: whisker must be a number >= 0 (the IQR rule's 1.5), got {self.whisker!r}")
        if not isinstance(self.plus, bool):
            raise PolicyError(f"prumerge_plus: plus must be True (PruMerge+) or False (PruMerge), got {self.plus!r}")
        check_layer(self.name, self.layer)

    def score_layer(self, site: SiteInfo | None, stream: TokenStream | None = None) -> int:
        return resolve_layer(self.name, self.layer, site, stream, default="last")

    def needs(self, site: SiteInfo) -> Needs:
        layer = self.score_layer(site)
        return Needs(signals={"cls_attn": (layer,), "keys": (layer,)}, source=self.trace_source)

    def kept_local(self, a: torch.Tensor) -> torch.Tensor:
        """Indices (into `a`, one sample's visual tokens) that survive: top outliers, then extras."""
        n = a.shape[0]
        count = min(max(iqr_outliers(a, self.whisker), 1), n)
        top = torch.argsort(a, descending=True, stable=True)[:count]
        if not self.plus:
            return top
        return torch.cat([top, uniform_extras(n, count, top)])

    def plan(self, stream: TokenStream) -> Plan | None:
        layer = self.score_layer(stream_site(stream), stream)
        attn, keys, assign, weight = merge_inputs(stream, layer)
        B, N = stream.pos.shape
        dev = stream.pos.device
        keeps, changed = [], False
        for b in range(B):
            vis = visual_indices(stream, b)
            prot = protected_indices(stream, b)
            n = len(vis)
            if n == 0:
                keeps.append(prot)
                continue
            a = attn[b, vis]
            kl = self.kept_local(a)
            is_kept = torch.zeros(n, dtype=torch.bool, device=dev)
            is_kept[kl] = True
            pruned = torch.nonzero(~is_kept).squeeze(1)
            if len(pruned) == 0:
                # nothing to prune: the tokens stay as they are, in sequence order, as when this
                # sample runs alone (no plan), not in the [top tokens, extras] order of a pruned row
                keeps.append(torch.cat([prot, vis]))
                continue
            kb = torch.cat([prot, vis[kl]])
            keeps.append(kb)
            changed = True
            k = min(self.knn, n - 1)
            if k <= 0:
                continue
            m = keys[b, vis]
            m = m / m.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            sim = m[kl] @ m.T                                   # (kept, n)
            sim[torch.arange(len(kl), device=dev), kl] = float("-inf")   # a token is not its own neighbour
            nn_idx = sim.topk(k, dim=1).indices                  # each kept token's k nearest
            near = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, nn_idx, True)
            s = sim[:, pruned].masked_fill(~near[:, pruned], float("-inf"))
            best = s.argmax(dim=0)                               # most similar kept token that has it
            has = near[:, pruned].any(dim=0)
            tgt = pruned[has]
            assign[b, vis[tgt]] = len(prot) + best[has]
            weight[b, vis[tgt]] = a[tgt]
        if not changed:
            return None
        for b, kb in enumerate(keeps):
            assign[b, kb] = torch.arange(len(kb), device=dev)
            weight[b, kb] = 1.0
        return pack(stream, keeps, assign=assign, weight=weight, normalize=False)
