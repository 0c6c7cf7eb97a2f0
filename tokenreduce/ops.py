"""Pure tensor functions shared by several reducers (no model, no stream)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def bipartite_soft_matching(metric: Tensor, r: int, protected: Tensor | None = None,
                            sort_unmerged: bool | None = None,
                            num_protected: int | None = None,
                            protected_first: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ToMe's bipartite soft matching (Bolya et al., ICLR 2023, Alg. 1).

    Tokens are split alternately into A (even indices) and B (odd). Every A token finds its most
    similar B token (cosine of `metric`); the r A tokens with the best matches merge into them.
    Protected tokens never act as a source (their A rows are -inf) and nothing merges into them
    (their B columns are -inf), which is how the reference protects CLS / distillation tokens.

    metric: (B, N, D). protected: (B, N) bool. num_protected: the protected tokens per sample when
    they are the first ones and the count is known on the host (saves device syncs; `protected`
    may then be None).
    protected_first (with num_protected): the survivors come ordered [the protected tokens in
    their own order, unmerged A, the rest of B], which is what a ViT reading its class and
    register tokens by index needs; otherwise a stream re-sorts them after every merge (an
    argsort and its gathers per block, on the device). Returns
      keep:   (B, N - r) current indices of the survivors, ordered [unmerged A, all of B]
              (unmerged A sorted ascending when protected tokens exist, as the reference does
              with a class token), or protected first as above;
      assign: (B, N) the slot in `keep` each token folds into;
      score:  (B, N // 2 rounded up) best-match similarity of each A token (for inspection).
      merged: (B, r) the merged A tokens' current indices (every other token is kept).
    """
    B, N, _ = metric.shape
    dev = metric.device
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    a, b = metric[:, ::2], metric[:, 1::2]
    na, nb = a.shape[1], b.shape[1]
    scores = a @ b.transpose(-1, -2)
    if num_protected is not None:  # `protected` is not read: the count says it all
        # the first num_protected tokens: (P + 1) // 2 of them in A, P // 2 in B (slices: no mask reads)
        n_prot, n_prot_a = num_protected, (num_protected + 1) // 2
        if n_prot_a:
            scores[:, :n_prot_a] = float("-inf")
        if n_prot // 2:
            scores[:, :, :n_prot // 2] = float("-inf")
    elif protected is not None:
        scores = scores.masked_fill(protected[:, ::2, None], float("-inf"))
        scores = scores.masked_fill(protected[:, None, 1::2], float("-inf"))
        n_prot_a = int(protected[:, ::2].sum(1).max())
        n_prot = int(protected.sum(1).max())
    else:
        n_prot_a = n_prot = 0
    # the reference clamps r to (N - protected) // 2
    r = max(0, min(r, (N - n_prot) // 2, na - n_prot_a, nb))
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unm_idx = edge_idx[:, r:]
    src_idx = edge_idx[:, :r]
    dst_idx = node_idx.gather(1, src_idx)
    if sort_unmerged is None:
        sort_unmerged = n_prot > 0
    if protected_first and (num_protected is None or (n_prot and not sort_unmerged)):
        raise ValueError("protected_first needs num_protected (the first tokens, known on the host) and "
                         "sorted unmerged tokens")
    if sort_unmerged:
        unm_idx = unm_idx.sort(dim=1).values
    n_unm = unm_idx.shape[1]
    unm_tok, src_tok = unm_idx * 2, src_idx * 2
    if protected_first and n_prot:
        # the protected A rows are -inf: never merged, and the first n_prot_a of the sorted
        # unmerged A (tokens 0, 2, ...); the protected B tokens are B's first P // 2 (1, 3, ...).
        # Slots: protected token t -> t, then the other unmerged A, then the other B tokens.
        pb = n_prot // 2
        keep = torch.cat([torch.arange(n_prot, device=dev).expand(B, n_prot), unm_tok[:, n_prot_a:],
                          torch.arange(2 * pb + 1, N, 2, device=dev).expand(B, nb - pb)], dim=1)
        dst_slot = dst_idx + (n_prot + n_unm - n_prot_a - pb)  # B token j >= pb (dst is never protected)
    else:
        keep = torch.cat([unm_tok, torch.arange(1, N, 2, device=dev).expand(B, nb)], dim=1)
        dst_slot = dst_idx + n_unm
    # every token is kept (its own slot) or merged (its dst's slot): two scatters fill assign
    K = keep.shape[1]
    assign = torch.empty(B, N, dtype=torch.long, device=dev)
    assign.scatter_(1, keep, torch.arange(K, device=dev).expand(B, K))
    assign.scatter_(1, src_tok, dst_slot)
    return keep, assign, node_max, src_tok


def fixed_under_compile(value):
    """`value` itself in eager code. Traced by torch.compile with dynamic shapes, a reducer's
    float (`keep=0.8`) or a count read back from the device is a symbol, and sizes derived from
    it nest into expressions that sympy takes tens of seconds to minutes over; this fixes the
    value the trace saw, guarded (another value recompiles), so the sizes stay plain ints."""
    if not torch.compiler.is_compiling():
        return value
    # imported here: the module costs about 2 s of import time (sympy)
    from torch.fx.experimental.symbolic_shapes import guard_scalar
    return guard_scalar(value)


def parse_r(num_layers: int, r, inflection: float = 0.0) -> list:
    """ToMe's per-layer merge schedule (tome.utils.parse_r).

    r: an int (constant, or a linear ramp with `inflection`: 0 = constant, -1 = decreasing from
    2r to ~0, +1 = increasing), a tuple (r, inflection) as the reference reads it, or an
    explicit list per layer (padded with zeros).
    """
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"r as a tuple is (r, inflection), got {r!r}")
        r, inflection = r
    if isinstance(r, list):
        r = list(r)
        return r + [0] * (num_layers - len(r)) if len(r) < num_layers else r[:num_layers]
    min_val = int(r * (1.0 - inflection))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1) if num_layers > 1 else 0
    return [int(min_val + step * i) for i in range(num_layers)]


def grid_lattice(h: int, w: int, k: int) -> Tensor:
    """k points spread evenly over an h x w grid: (k, 2) float (row, col) coordinates."""
    h, w, k = fixed_under_compile(h), fixed_under_compile(w), fixed_under_compile(k)
    if k <= 0:
        return torch.zeros(0, 2)
    rows = max(1, min(h, round(math.sqrt(k * h / max(w, 1)))))
    cols = max(1, math.ceil(k / rows))
    while rows * cols < k:
        cols += 1
    ys = (torch.arange(rows, dtype=torch.float32) + 0.5) * h / rows - 0.5
    xs = (torch.arange(cols, dtype=torch.float32) + 0.5) * w / cols - 0.5
    pts = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    if pts.shape[0] > k:  # drop evenly spaced extras so the points stay spread out
        sel = torch.linspace(0, pts.shape[0] - 1, k).round().long()
        pts = pts[sel]
    return pts


def nearest_unique(points: Tensor, coords: Tensor) -> Tensor:
    """For each target point, the index of the nearest coordinate not yet taken (greedy).

    points: (k, 2); coords: (n, 2) with n >= k. Returns (k,) distinct indices into coords.
    """
    d = torch.cdist(points.float(), coords.float())
    taken = torch.zeros(coords.shape[0], dtype=torch.bool)
    out = []
    for i in range(points.shape[0]):
        row = d[i].masked_fill(taken, float("inf"))
        j = int(row.argmin())
        taken[j] = True
        out.append(j)
    return torch.tensor(out, dtype=torch.long)
