"""timm VisionTransformer (ViT, DeiT incl. distilled, DeiT-III LayerScale, QK-norm, registers)."""
from __future__ import annotations

import weakref

import torch

from tokenreduce.errors import SiteError, UnsupportedModelError
from tokenreduce.registry import register_adapter

from .base import is_a
from .vit import BlockParts, ViTAdapter, merge_bias, size_weighted_mean


@register_adapter
class TimmViTAdapter(ViTAdapter):
    name = "timm_vit"
    family = "timm VisionTransformer"

    @classmethod
    def matches(cls, model) -> bool:
        return is_a(model, "timm.models.vision_transformer.VisionTransformer")

    def __init__(self, model):
        super().__init__(model)
        for i, blk in enumerate(model.blocks):
            # timm's pre-norm Block only: ResPostBlock (post-norm, e.g. vit_*_rpn_*) has the same
            # attribute names but applies norm2 after the MLP, so norm2 is not the MLP's input
            if not is_a(blk, "timm.models.vision_transformer.Block") or \
                    not all(hasattr(blk, a) for a in ("norm1", "attn", "norm2", "mlp", "drop_path2")) or \
                    not self._plain_attention(blk.attn):
                raise UnsupportedModelError(
                    f"timm block {i} is a {type(blk).__name__} with attention {type(getattr(blk, 'attn', None)).__name__}; "
                    "tokenreduce supports timm's pre-norm Block with fused qkv Attention")
        self.num_prefix = int(model.num_prefix_tokens)
        self.cls_index = 0 if getattr(model, "cls_token", None) is not None else None
        if self.cls_index is None:
            self.no_cls_note = f"{type(model).__name__} was built without a class token"

    @staticmethod
    def _plain_attention(attn) -> bool:
        """timm's Attention layout: one qkv projection of 3 x heads x head_dim (DiffAttention
        also has a qkv, but with 2 x heads half-size q/k heads and no attn_dim)"""
        qkv = getattr(attn, "qkv", None)
        return qkv is not None and hasattr(attn, "attn_dim") and \
            getattr(qkv, "out_features", None) == 3 * attn.num_heads * attn.head_dim

    def blocks(self):
        return list(self.model.blocks)

    def parts(self, i):
        b = self.model.blocks[i]
        return BlockParts(attn=b.attn, mlp_in=b.norm2, mlp_out=b.drop_path2)

    def patch_module(self):
        return getattr(self.model.patch_embed, "proj", None)

    def out_module(self):
        return self.model.norm

    def attn_dim(self, i):
        return self.model.blocks[i].attn.attn_dim

    def capture_qk(self, i, want_q, fn):
        attn = self.model.blocks[i].attn

        def hook(module, args, out):
            B, N, _ = out.shape
            qkv = out.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            k = attn.k_norm(qkv[1])
            q = attn.q_norm(qkv[0][:, :, :1]) if want_q else None
            fn(q, k, attn.scale)
        self.hooks.post(attn.qkv, hook)

    def add_attention_bias(self, i, bias_fn):
        def hook(module, args, kwargs):
            bias = bias_fn()
            if bias is None:
                return None
            x = args[0] if args else kwargs["x"]
            bias = merge_bias(kwargs.get("attn_mask"), bias, x.dtype)
            kwargs = dict(kwargs)
            kwargs["attn_mask"] = bias
            return args, kwargs
        self.hooks.pre(self.model.blocks[i].attn, hook, with_kwargs=True)

    def pools_patches_only(self) -> bool:
        m = self.model
        return (self.num_prefix > 0 and getattr(m, "attn_pool", None) is None
                and getattr(m, "global_pool", "") in ("avg", "avgmax", "max")
                and not getattr(m, "pool_include_prefix", False))

    def install_extra(self):
        m = self.model
        # ToMe (reference, mae.py): with merged tokens an average pool must weight by size
        # ('avgmax' averages too; its max is unaffected by sizes)
        if getattr(m, "attn_pool", None) is None and getattr(m, "global_pool", "") in ("avg", "avgmax"):
            self.hooks.pre(m.fc_norm, self._weighted_avg_pool)
        if getattr(m, "attn_pool", None) is not None and callable(getattr(m.attn_pool, "forward", None)):
            # 'map' (attention pooling, timm's SigLIP): log(size) on each key, as the HF SigLIP head
            self.hooks.pre(m.attn_pool, self._sized_attention_pool, with_kwargs=True)
        self.check_intermediates(m)  # get_intermediate_layers calls forward_intermediates too
        if any(n.startswith(("vision.block.", "vision.layer.")) for n in self._by_site):
            self.hooks.pre(m.blocks[0], self._refuse_attn_mask, with_kwargs=True)

    @staticmethod
    def _refuse_attn_mask(module, args, kwargs):
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            # built for the full token count: the blocks after a reduction see fewer tokens
            raise SiteError("forward_features(attn_mask=... / is_causal=True) with a reduction inside the blocks: "
                            "the mask is built for the full token count and is not reduced with the tokens; "
                            "run without it, reduce at vision.out only, or remove the reduction")
        return None

    def _weighted_avg_pool(self, module, args):
        x = args[0]
        tokens = self._final_x() if self._final_x is not None else None
        size = None if tokens is None else self.merged_sizes(tokens)
        if size is None:
            return None
        # prefix tokens (size 1) join the pool with pool_include_prefix
        start = 0 if getattr(self.model, "pool_include_prefix", False) else self.num_prefix
        t = tokens[:, start:]
        mean, weighted = t.mean(1), size_weighted_mean(t, size[:, start:])
        if self.model.global_pool == "avgmax":  # timm's global_pool_nlc, term for term
            peak = t.amax(1)
            mean, weighted = 0.5 * (peak + mean), 0.5 * (peak + weighted)
        # only the pool of this forward's own tokens is replaced: forward_head(other features)
        # must pool what it is given, not the last forward's tokens. Decided on the device (no
        # value read back), so that the forward can be captured in a CUDA graph or compiled
        if tokens.shape[0] != x.shape[0] or mean.shape != x.shape:
            return None
        return (torch.where((mean == x).all(), weighted, x),)

    def _sized_attention_pool(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        tokens = self._final_x() if self._final_x is not None else None
        size = None if tokens is None or x is None else self.merged_sizes(tokens)
        if size is None or tokens.shape[0] != x.shape[0]:
            return None
        start = tokens.shape[1] - x.shape[1]  # the pool sees the tokens after the prefix, or all of them
        # only the pool of this forward's own tokens: forward_head(other features) pools as given
        # (a zero bias), decided on the device as in _weighted_avg_pool
        if start not in (0, self.num_prefix) or tokens[:, start:].shape != x.shape:
            return None
        own = (tokens[:, start:] == x).all()
        bias = torch.where(own, size[:, start:].log(), 0.0)[:, None, None, :]
        kwargs = dict(kwargs)
        kwargs["attn_mask"] = merge_bias(kwargs.get("attn_mask"), bias, x.dtype)
        return (x,), kwargs

    def _on_out(self, module, args, output):
        p = self._pass
        if self._in_intermediates and p is not None:
            # forward_intermediates(norm=True) runs the final norm on every intermediate too: only
            # a norm after the last block is the encoder's output, and the last block's
            # intermediate and the final output are the same tokens, reduced once
            if len(self.blocks()) - 1 not in p.after:
                return None
            seen = self._out_seen
            if seen is not None and seen[0] is p and torch.equal(seen[1], output):
                return seen[2]
        res = super()._on_out(module, args, output)
        # a weak reference: the pool of this forward reads it while the tokens are alive; held
        # strongly it would keep the forward's graph after the forward
        self._final_x = weakref.ref(output if res is None else res)
        if self._in_intermediates:
            self._out_seen = (p, output, res)
        return res
