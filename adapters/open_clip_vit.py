"""open_clip VisionTransformer (ResidualAttentionBlock with nn.MultiheadAttention)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from tokenreduce.errors import UnsupportedModelError
from tokenreduce.registry import register_adapter

from .base import is_a
from .vit import BlockParts, ViTAdapter, padding_bias, size_weighted_mean

_VT = "open_clip.transformer.VisionTransformer"


@register_adapter
class OpenClipViTAdapter(ViTAdapter):
    """Works on `model.visual` or on the whole CLIP model (its `visual` tower is reduced).

    nn.MultiheadAttention exposes no q/k submodules, so keys (and the CLS query) are recomputed
    from `in_proj_weight` when a reducer asks for them: one extra N x C x C matmul per layer
    that needs it (~8% of a block). After merging, the average pool of 'avg' models weights
    each token by its size, as ToMe's reference does, and CoCa's attentional pooler counts each
    key as the tokens it stands for.
    """

    name = "open_clip_vit"
    family = "open_clip VisionTransformer"

    @classmethod
    def matches(cls, model) -> bool:
        return is_a(model, _VT) or is_a(getattr(model, "visual", None), _VT)

    def __init__(self, model):
        super().__init__(model)
        self.visual = model if is_a(model, _VT) else model.visual
        tr = self.visual.transformer
        if not getattr(tr, "batch_first", True):
            raise UnsupportedModelError("open_clip transformer with batch_first=False (sequence-first layout) "
                                        "is not supported; build the model with open_clip >= 2.24 defaults")
        for i, blk in enumerate(tr.resblocks):
            # CustomResidualAttentionBlock (qk_norm, scale_*, scaled_cosine_attn) has its own Attention
            if not hasattr(blk, "ln_2") or not isinstance(blk.attn, nn.MultiheadAttention) or \
                    blk.attn.in_proj_weight is None:
                raise UnsupportedModelError(f"open_clip block {i} ({type(blk).__name__}, attention "
                                            f"{type(getattr(blk, 'attn', None)).__name__}) is not a "
                                            "ResidualAttentionBlock with nn.MultiheadAttention and packed "
                                            "in-projection (open_clip's default ViT)")
        self.num_prefix = 1 if getattr(self.visual, "class_embedding", None) is not None else 0
        self.cls_index = 0 if self.num_prefix else None

    def install_extra(self):
        self.check_intermediates(self.visual)
        v = self.visual
        if getattr(v, "attn_pool", None) is None and getattr(v, "pool_type", None) == "avg":
            # its average pool (`_global_pool`, a method: no module to hook between the pool and
            # the projection) weighted by size after merging, wrapped on this instance only
            original = v._global_pool

            def _global_pool(x):
                pooled, tokens = original(x)
                size = self.merged_sizes(x)
                if size is not None:
                    pooled = size_weighted_mean(x[:, 1:], size[:, 1:])
                return pooled, tokens
            self.hooks.setattr(v, "_global_pool", _global_pool)
        # CoCa's attentional pooler: a merged token is as many keys as it stands for, i.e. log(size)
        # on its logit (as timm's 'map' pool). The contrastive pooler of 'cascade' reads the first
        # pooler's queries, not the tokens, so it keeps its plain keys.
        poolers = [getattr(v, "attn_pool", None)]
        if getattr(v, "attn_pool_type", "") == "parallel":
            poolers.append(getattr(v, "attn_pool_contrastive", None))
        for pooler in poolers:
            if isinstance(getattr(pooler, "attn", None), nn.MultiheadAttention):
                self.hooks.pre(pooler.attn, self.sized_pool_keys, with_kwargs=True)

    def checkpoint_scope(self):
        return self.visual

    def pools_patches_only(self) -> bool:
        v = self.visual
        return self.num_prefix > 0 and getattr(v, "attn_pool", None) is None and getattr(v, "pool_type", None) == "avg"

    def intermediates_refusal(self, arguments):
        # with intermediates_only there is no final output, so no vision.out result to miss
        if "vision.out" in self._by_site and not arguments.get("intermediates_only", False):
            return ("open_clip's forward_intermediates runs the blocks without the transformer's forward, where "
                    "vision.out sits, so that stage would not run; call the model itself, or place the stage at "
                    "vision.layer.* / vision.block.*")
        return None

    def blocks(self):
        return list(self.visual.transformer.resblocks)

    def parts(self, i):
        b = self.visual.transformer.resblocks[i]
        return BlockParts(attn=b.attn, mlp_in=b.ln_2, mlp_out=b.ls_2)

    def patch_module(self):
        return self.visual.conv1

    def out_module(self):
        return self.visual.transformer

    def attn_dim(self, i):
        return self.visual.transformer.resblocks[i].attn.embed_dim

    def capture_qk(self, i, want_q, fn):
        mha = self.visual.transformer.resblocks[i].attn
        C, H = mha.embed_dim, mha.num_heads
        hd = C // H

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["query"]
            W, b = mha.in_proj_weight, mha.in_proj_bias
            B, N, _ = x.shape
            k = F.linear(x, W[C:2 * C], None if b is None else b[C:2 * C]).reshape(B, N, H, hd).transpose(1, 2)
            q = None
            if want_q:
                q = F.linear(x[:, :1], W[:C], None if b is None else b[:C]).reshape(B, 1, H, hd).transpose(1, 2)
            fn(q, k, hd ** -0.5)
        self.hooks.pre(mha, hook, with_kwargs=True)

    def add_attention_bias(self, i, bias_fn):
        def hook(module, args, kwargs):
            bias = bias_fn()
            if bias is None:
                return None
            x = args[0] if args else kwargs["query"]
            kwargs = dict(kwargs)
            # a float key_padding_mask (B, N) is added to the logits of every query and head
            kwargs["key_padding_mask"] = padding_bias(kwargs.get("key_padding_mask"), bias[:, 0, 0, :], x.dtype)
            return args, kwargs
        self.hooks.pre(self.visual.transformer.resblocks[i].attn, hook, with_kwargs=True)
