"""FrameFusion: merge temporally similar video tokens, then prune by importance, inside the LLM."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import PolicyError
from ..registry import register_reducer
from ..stream import Plan, TokenStream
from .base import Needs, Reducer, SiteInfo, check_choice, check_fraction

MERGING, PRUNING, DONE = 0, 1, 2
_NO_PAIR = -2.0  # the reference's IGNORE_TOKEN similarity: no predecessor at this patch position


def compute_pruning_ratio(sparsity_list, cost: float, num_layers: int) -> float:
    """The sparsity u the remaining layers need so that the whole LLM meets the `cost` budget.

    Reference: FrameFusion `_compute_pruning_ratio` (framefusion/main.py), with `num_layers` a
    required argument instead of the hard-coded 28. `sparsity_list[i]` is the fraction of the
    visual tokens removed before layer i (relative to the count entering it). With
    P = prod(1 - s_i) and n = len(sparsity_list), u solves

        sum_{i<n} prod_{j<=i}(1 - s_j)  +  (num_layers - n) * P * (1 - u)  =  num_layers * cost,

    i.e. the summed per-layer fraction of visual tokens equals num_layers * cost. u is clamped
    at 0 when the budget is met without further reduction; ValueError when the layers already
    run have overspent it (the reference's "The cost is too small").
    """
    num_layers = int(num_layers)
    n = len(sparsity_list)
    if n >= num_layers:
        raise ValueError(f"sparsity_list has {n} entries but the model has only {num_layers} layers")
    s = 1.0
    total = 0.0
    for v in sparsity_list:
        s *= 1.0 - float(v)
        total += s
    remain = num_layers * float(cost) - total
    if remain < 0:
        raise ValueError(f"the cost is too small: the layers already run used {total:.4g} of a budget of "
                         f"{num_layers * float(cost):.4g} layer-equivalents")
    denom = (num_layers - n) * s
    if denom <= 0 or remain / denom > 1:
        return 0.0
    return 1.0 - remain / denom


@register_reducer
@dataclass
class FrameFusion(Reducer):
    """FrameFusion: Combining Similarity and Importance for Video Token Reduction on Large
    Vision Language Models. Fu et al., ICCV 2025, arXiv:2501.01986. Reference: thu-nics/FrameFusion
    (framefusion/main.py, models/qwen2/modeling_qwen2.py), commit fbec1d2e.

    Placement: every LLM layer, `llm.layer.*=framefusion(cost=0.3, similarity_lower_bound=0.6,
    ratio_lower_bound=0.1)`. Per sample and per forward (prefill only; decode steps reuse the
    prefill's tokens):

    1. Merging, at successive sites while active. Each visual token is compared (cosine, on the
       current hidden states) with the token at the same patch position in the previous
       remaining frame. The budget u = compute_pruning_ratio(sparsity_list, cost, depth) uses
       the model's real depth (`stream.depth`, or `num_layers` when given), never the
       reference's hard-coded 28. With ratio = (#tokens with similarity >= S_th) / (#visual
       tokens): if ratio < u, merge all of them, append ratio to the sparsity list and stop
       merging when ratio < ratio_lower_bound; otherwise merge the top floor(u * #visual) by
       similarity and stop merging *and* pruning (the budget is met).
    2. Chain merge: a run of m consecutive merged tokens at one patch position (frames f+1..f+m,
       each similar to its predecessor) folds into the earliest anchor (frame f), which becomes
       the mean of the m+1 tokens; the others are removed. Expressed as a Plan with `assign`
       (each member -> its anchor's slot) and `weight`, so apply_plan computes the mean.
    3. Pruning, at the next site after merging stops: the last `num_queries` queries' attention
       (head- and query-averaged) of the layer in between; keep the top round(n * (1 - u))
       visual tokens (u recomputed from the same budget), then stop.
    Survivors keep their original RoPE positions (the adapter gathers cos/sin), as the reference.

    Merge weights across layers (`merge_weight`): the reference averages with equal weight at
    each layer and keeps no sizes, so an anchor that absorbed k tokens at an earlier layer counts
    as one token when it absorbs more later ("cascaded" merges over-weight later members).
    "equal" (default) reproduces that exactly: every token in this layer's chain has weight 1.
    "size" weights by the tokens' sizes (how many original tokens each one stands for), giving
    the true mean over original tokens; within one layer of fresh tokens both are identical.
    Sizes are tracked either way (apply_plan sums them) but FrameFusion never asks for
    proportional attention, so they do not reach the attention logits.

    Deviations from the reference, all deliberate:
    - Site placement: our `llm.layer.k` sits *before* decoder layer k (after layer k-1's MLP).
      The reference merges in layer 0 before attention and then in every layer after
      attention + residual, before the MLP; pruning uses the attention of the layer it runs in.
      Here merging runs on the input of layer k and pruning at site k uses layer k-1's last-query
      attention, so every decision moves from "mid-layer" to "between layers" (one MLP later).
      The per-layer budget bookkeeping is unchanged: entry i of the sparsity list is the
      reduction applied before layer i. When the stage is not placed at every layer, layers
      without a FrameFusion site count as sparsity 0, so the cost still refers to the whole LLM.
    - Batched: the reference asserts batch 1. Each sample keeps its own sparsity list and phase
      (in `stream.memo`); per-sample counts differ, so plans are ragged (padding slots masked).
    - Visual tokens are the stream's VISUAL tokens. LLaVA-Video's per-row newline tokens are a
      patch position in the reference (P = p(p+1)) and can merge there; here they are PROTECTED
      (never removed) and do not count in #visual. Tokens without a frame (images) never merge.
    - Pairs must also have increasing frame indices, so two videos in one prompt never merge
      across each other (the reference has one video per prompt).
    - Top-k uses a stable sort (ties keep sequence order); the reference's torch.topk does not
      promise an order for ties.
    - When earlier merges already overspent the budget (the reference raises "The cost is too
      small"), u = 1: merging takes every token above threshold and the pruning stage removes the
      remaining visual tokens.
    - The frame-to-frame cosine is computed in float32 (eps 1e-12); the reference computes it in
      the hidden states' dtype (bf16 in practice). Merge decisions matched in bf16 runs; values
      differ at bf16 rounding.
    - The last-query attention is captured at every layer after the first site (a few rows, next
      to SDPA) since the pruning layer is only known at run time; the reference computes it in
      the one layer that needs it.
    """

    name = "framefusion"
    summary = "merge tokens similar to the previous frame, then prune by last-query attention, to a compute budget"
    paper = "Fu et al., FrameFusion: Combining Similarity and Importance for Video Token Reduction, ICCV 2025 (arXiv:2501.01986)"
    site_families = ("llm.layer",)

    cost: float = 0.3
    similarity_lower_bound: float = 0.6
    ratio_lower_bound: float = 0.1
    num_queries: int = 1
    merge_weight: str = "equal"
    num_layers: object = None

    def __post_init__(self):
        check_fraction(self.name, "cost", self.cost, 0.0, 1.0, lo_open=True)
        check_fraction(self.name, "similarity_lower_bound", self.similarity_lower_bound, -1.0, 1.0)
        check_fraction(self.name, "ratio_lower_bound", self.ratio_lower_bound, 0.0, 1.0)
        if isinstance(self.num_queries, bool) or not isinstance(self.num_queries, int) or self.num_queries < 1:
            raise PolicyError(f"{self.name}: num_queries must be an int >= 1 (1 for LLaVA-Video / Qwen2, "
                              f"4 for Qwen2-VL in the reference), got {self.num_queries!r}")
        check_choice(self.name, "merge_weight", self.merge_weight, ("equal", "size"))
        if self.num_layers is not None and (isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int)
                                            or self.num_layers < 1):
            raise PolicyError(f"{self.name}: num_layers must be None (the model's depth) or an int >= 1, "
                              f"got {self.num_layers!r}")

    # -- contract -----------------------------------------------------------------------------
    @property
    def _signal(self) -> str:
        return "last_query_attn" if self.num_queries == 1 else f"last_query_attn:{self.num_queries}"

    def needs(self, site: SiteInfo) -> Needs:
        if not site.index:  # llm.layer.0: merging only, no layer has run yet
            return Needs()
        return Needs(signals={self._signal: (None,)})

    def check_site(self, site: SiteInfo) -> None:
        super().check_site(site)
        L = self.num_layers or site.depth
        if site.depth is not None and L is not None and site.index is not None and site.index >= L:
            raise PolicyError(f"{self.name}: num_layers={L} but the stage sits at {site.name}; use "
                              f"num_layers > {site.index} or leave it None (the model's depth, {site.depth})")

    # -- helpers ------------------------------------------------------------------------------
    def budget(self, sparsity_list, depth: int) -> float:
        """u for the next layer; 1.0 when the budget is already overspent."""
        try:
            return compute_pruning_ratio(sparsity_list, self.cost, depth)
        except ValueError:
            return 1.0

    @property
    def _memo_key(self) -> str:
        return f"framefusion@{id(self)}"  # this instance's state in a forward's memo

    def may_act(self, memo: dict) -> bool:
        st = memo.get(self._memo_key)
        return st is None or any(phase != DONE for phase in st["phase"])

    def _state(self, stream: TokenStream) -> dict:
        key = self._memo_key
        st = stream.memo.get(key)
        if st is None or len(st["phase"]) != stream.batch:
            st = {"phase": [MERGING] * stream.batch, "sparsity": [[] for _ in range(stream.batch)],
                  "history": [[] for _ in range(stream.batch)]}
            stream.memo[key] = st
        return st

    @staticmethod
    def similarity_by_patch(stream: TokenStream, b: int):
        """For sample b: the eligible visual tokens sorted by (patch position, sequence order), and
        each one's cosine similarity to its predecessor at the same patch position (-2: none)."""
        x = stream.x[b]
        N = x.shape[0]
        dev = x.device
        vis = stream.visual[b]
        frame = stream.frame[b]
        patch = stream.patch[b] if stream.patch is not None else torch.full_like(frame, -1)
        elig = vis & (frame >= 0) & (patch >= 0)
        idx = torch.arange(N, device=dev)
        key = torch.where(elig, patch * N + idx, (patch.max().clamp(min=0) + 1) * N + idx)
        order = torch.argsort(key)[: int(elig.sum())]
        sim = torch.full((order.numel(),), _NO_PAIR, device=dev, dtype=torch.float32)
        if order.numel() > 1:
            p, f = patch[order], frame[order]
            pair = (p[1:] == p[:-1]) & (f[1:] > f[:-1])
            xo = x[order].float()
            cos = torch.nn.functional.cosine_similarity(xo[:-1], xo[1:], dim=-1, eps=1e-12)
            sim[1:] = torch.where(pair, cos, torch.full_like(cos, _NO_PAIR))
        return order, sim

    # -- plan ---------------------------------------------------------------------------------
    def plan(self, stream: TokenStream) -> Plan | None:
        st = self._state(stream)
        B, N = stream.pos.shape
        dev = stream.pos.device
        depth = int(self.num_layers or stream.depth or 0)
        k = int(stream.layer or 0)
        if depth <= 0 or k >= depth or not self.may_act(stream.memo):  # every sample has pruned
            return None
        ar = torch.arange(N, device=dev)
        target = ar.expand(B, N).clone()   # the current token each token folds into; -1 = dropped
        merged_any = pruned_any = False
        n_vis = stream.num_visual()
        attn = None
        for b in range(B):
            phase = st["phase"][b]
            if phase == DONE:
                continue
            sp = st["sparsity"][b]
            sp.extend([0.0] * (k - len(sp)))  # layers without a site ran with unchanged counts
            n = int(n_vis[b])
            if n == 0:
                st["phase"][b] = DONE
                continue
            u = self.budget(sp, depth)
            if phase == PRUNING:
                if attn is None:
                    attn = stream.signal(self._signal)
                keep_n = int(round(n * (1.0 - u)))
                if keep_n < n:
                    vis = stream.visual[b]
                    s = attn[b].float().masked_fill(~vis, float("-inf"))
                    order = torch.argsort(s, descending=True, stable=True)
                    drop = order[keep_n:n]
                    target[b, drop] = -1
                    pruned_any = True
                st["history"][b].append(("prune", k, u, n - keep_n))
                st["phase"][b] = DONE
                continue
            # merging
            order, sim = self.similarity_by_patch(stream, b)
            pair = sim > _NO_PAIR
            above = pair & (sim >= self.similarity_lower_bound)
            ratio = int(above.sum()) / n
            if ratio < u:
                merge = above
                sp.append(ratio)
                if ratio < self.ratio_lower_bound:
                    st["phase"][b] = PRUNING
            else:
                kk = int(u * n)
                s = sim.masked_fill(~pair, float("-inf"))
                top = torch.argsort(s, descending=True, stable=True)[:kk]
                merge = torch.zeros_like(above)
                merge[top] = True
                st["phase"][b] = DONE
            st["history"][b].append(("merge", k, u, int(merge.sum())))
            if bool(merge.any()):
                pos = torch.arange(order.numel(), device=dev)
                anchor = torch.cummax(torch.where(merge, torch.full_like(pos, -1), pos), 0).values
                members = order[merge]
                target[b, members] = order[anchor[merge]]
                merged_any = True
        if not (merged_any or pruned_any):
            return None
        return self._make_plan(target, merged_any)

    def _make_plan(self, target: Tensor, merged: bool) -> Plan:
        B, N = target.shape
        dev = target.device
        ar = torch.arange(N, device=dev).expand(B, N)
        kept = target == ar
        counts = kept.sum(1)
        K = int(counts.max())
        # kept tokens first, in order; padding slots (ragged batches) claim nothing in apply_plan
        keep = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :K]
        valid = torch.arange(K, device=dev)[None] < counts[:, None]
        assign = None
        weight = None
        if merged:
            slot_of = kept.long().cumsum(1) - 1
            assign = torch.where(target >= 0, slot_of.gather(1, target.clamp(min=0)), torch.full_like(target, -1))
            if self.merge_weight == "equal":
                weight = torch.ones(B, N, device=dev)
        return Plan(keep=keep, assign=assign, weight=weight, valid=None if bool(valid.all()) else valid)
