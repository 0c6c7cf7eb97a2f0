"""Cheap attention rows computed from q/k next to the model's own fused attention.

Score-based reducers need only a few query rows (the CLS row in a ViT, the last prompt tokens
in an LLM). Computing those rows costs O(rows * N) per head, so the model keeps running SDPA /
FlashAttention for its actual output and no layer runs twice.

Shapes: q, k are (B, H, N, D) (k may have fewer heads for grouped-query attention).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _repeat_kv(k: Tensor, n_heads: int) -> Tensor:
    if k.shape[1] == n_heads:
        return k
    return k.repeat_interleave(n_heads // k.shape[1], dim=1)


def attention_rows(q_rows: Tensor, k: Tensor, scale: float, bias: Tensor | None = None,
                   key_mask: Tensor | None = None) -> Tensor:
    """softmax(q_rows k^T * scale + bias) per head: (B, H, R, N), in float32.

    bias: broadcastable to (B, H, R, N) additive logits (e.g. ToMe's log(size)).
    key_mask: (B, N) bool, False keys get -inf (padding).
    """
    k = _repeat_kv(k, q_rows.shape[1])
    logits = torch.matmul(q_rows.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias.float()
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1)


def cls_attention(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None, cls_index: int = 0) -> Tensor:
    """Head-averaged attention of the CLS query to every token: (B, N)."""
    rows = attention_rows(q[:, :, cls_index:cls_index + 1], k, scale, bias)
    return rows.mean(dim=1)[:, 0]


def last_query_attention(q: Tensor, k: Tensor, scale: float, n: int = 1, causal_offset: int | None = None,
                         key_mask: Tensor | None = None, query_valid: Tensor | None = None) -> Tensor:
    """Attention of the last `n` queries, averaged over heads and those queries: (B, N).

    With n > 1 the earlier of those queries only see keys up to their own position (causal).
    query_valid (B, N): which rows are real tokens. A ragged plan leaves padding slots at the end of
    the shorter samples; their last queries are then each sample's own last n valid rows.
    """
    if query_valid is not None and causal_offset is None and not bool(query_valid[:, -n:].all()):
        idx = torch.arange(q.shape[2], device=q.device).expand_as(query_valid)
        rows = torch.where(query_valid, idx, torch.full_like(idx, -1)).topk(n, dim=1).values.flip(1)
        return query_rows_attention(q, k, scale, rows.clamp(min=0), key_mask, causal=True).mean(1)
    N = k.shape[2]
    qn = q[:, :, -n:]
    bias = None
    if n > 1:
        qpos = torch.arange(q.shape[2] - n, q.shape[2], device=q.device)
        if causal_offset is not None:
            qpos = qpos + causal_offset
        kpos = torch.arange(N, device=q.device)
        bias = torch.zeros(n, N, device=q.device).masked_fill(kpos[None] > qpos[:, None], float("-inf"))
    rows = attention_rows(qn, k, scale, bias, key_mask)
    return rows.mean(dim=(1, 2))


def query_rows_attention(q: Tensor, k: Tensor, scale: float, rows: Tensor, key_mask: Tensor | None = None,
                         causal: bool = True) -> Tensor:
    """Attention of selected query positions `rows` (B, R) to every key, head-averaged: (B, R, N)."""
    B, H, N, D = q.shape
    qr = q.gather(2, rows[:, None, :, None].expand(B, H, rows.shape[1], D))
    bias = None
    if causal:
        kpos = torch.arange(k.shape[2], device=q.device)
        bias = torch.zeros(B, 1, rows.shape[1], k.shape[2], device=q.device)
        bias = bias.masked_fill(kpos[None, None, None] > rows[:, None, :, None], float("-inf"))
    return attention_rows(qr, k, scale, bias, key_mask).mean(dim=1)


def head_mean_keys(k: Tensor) -> Tensor:
    """Keys averaged over heads, (B, N, D): ToMe's and STA's similarity metric."""
    return k.mean(dim=1)
