"""Analytic FLOPs of transformer layers (a multiply-add counts as 2 FLOPs)."""
from __future__ import annotations

from torch import nn


def linear_macs(module: nn.Module) -> int:
    """Multiply-adds per token of every nn.Linear inside `module`, and of nn.MultiheadAttention's
    packed q/k/v in-projection (a parameter, not a Linear; its out_proj is a Linear)."""
    macs = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            macs += m.in_features * m.out_features
        elif isinstance(m, nn.MultiheadAttention):
            if m.in_proj_weight is not None:
                macs += m.in_proj_weight.numel()
            else:  # separate q/k/v weights (kdim / vdim differ from embed_dim)
                macs += sum(w.numel() for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight))
    return macs


def attention_flops(n_query: float, n_key: float, attn_dim: int) -> float:
    """QK^T and AV for `n_query` queries over `n_key` keys, all heads together."""
    return 2.0 * 2.0 * n_query * n_key * attn_dim


def block_flops(n_in: float, n_out: float, attn_macs: int, mlp_macs: int, attn_dim: int,
                n_key: float | None = None) -> float:
    """One pre-norm block whose attention sees `n_in` tokens and whose MLP sees `n_out`."""
    n_key = n_in if n_key is None else n_key
    return 2.0 * n_in * attn_macs + attention_flops(n_in, n_key, attn_dim) + 2.0 * n_out * mlp_macs
