"""Hugging Face vision towers: CLIPVisionModel(+WithProjection), SiglipVisionModel (no CLS),
Dinov2Model and Dinov2WithRegistersModel. Also used by the LLaVA-family adapter for the tower
inside a VLM."""
from __future__ import annotations

from torch import nn

from tokenreduce.errors import SiteError
from tokenreduce.registry import register_adapter

from .base import is_a
from .vit import BlockParts, ViTAdapter, merge_bias

_T = "transformers.models."
CLIP_LIKE = (_T + "clip.modeling_clip.CLIPVisionModel", _T + "siglip.modeling_siglip.SiglipVisionModel")
DINO_LIKE = (_T + "dinov2.modeling_dinov2.Dinov2Model",
             _T + "dinov2_with_registers.modeling_dinov2_with_registers.Dinov2WithRegistersModel")
WRAPPED = (_T + "clip.modeling_clip.CLIPVisionModelWithProjection",)


@register_adapter
class HFVisionAdapter(ViTAdapter):
    name = "hf_vision"
    family = "transformers CLIP / SigLIP / DINOv2 vision towers"

    @classmethod
    def matches(cls, model) -> bool:
        return is_a(model, *CLIP_LIKE, *DINO_LIKE, *WRAPPED)

    def __init__(self, model):
        super().__init__(model)
        tower = model.vision_model if is_a(model, *WRAPPED) else model
        self.tower = tower
        self.dino = is_a(tower, *DINO_LIKE)
        self.layers = tower.encoder.layer if self.dino else tower.encoder.layers
        if is_a(tower, _T + "siglip.modeling_siglip.SiglipVisionModel"):
            self.num_prefix, self.cls_index = 0, None
            self.no_cls_note = "SigLIP has no [CLS] token"
        else:
            regs = int(getattr(tower.config, "num_register_tokens", 0) or 0) if self.dino else 0
            self.num_prefix, self.cls_index = 1 + regs, 0

    def install_extra(self):
        head = getattr(self.tower, "head", None)
        attention = getattr(head, "attention", None)
        if isinstance(attention, nn.MultiheadAttention):
            # SigLIP's attention-pooling head: after merging, each token's key gets log(size)
            # (proportional attention, as ToMe's blocks do), so the probe pools merged tokens
            # as the tokens they stand for
            self.hooks.pre(attention, self.sized_pool_keys, with_kwargs=True)

    def blocks(self):
        return list(self.layers)

    def _attn(self, i):
        layer = self.layers[i]
        return layer.attention if self.dino else layer.self_attn

    def parts(self, i):
        layer = self.layers[i]
        if self.dino:  # norm2 -> mlp -> layer_scale2 -> drop_path (shared with the attention half)
            return BlockParts(attn=layer.attention, mlp_in=layer.norm2, mlp_out=layer.drop_path)
        return BlockParts(attn=layer.self_attn, mlp_in=layer.layer_norm2, mlp_out=layer.mlp)

    def patch_module(self):
        emb = self.tower.embeddings
        return emb.patch_embeddings.projection if self.dino else emb.patch_embedding

    def out_module(self):
        return self.tower.layernorm if self.dino else self.tower.encoder

    def attn_dim(self, i):
        return self._attn(i).k_proj.out_features

    def _heads(self, i):
        a = self._attn(i)
        heads = getattr(a, "num_heads", None) or a.num_attention_heads
        scale = getattr(a, "scale", None) or a.scaling
        return heads, a.head_dim, scale

    def capture_qk(self, i, want_q, fn):
        a = self._attn(i)
        heads, hd, scale = self._heads(i)
        box = {}

        def on_q(module, args, out):
            box["q"] = out[:, :1].reshape(out.shape[0], 1, heads, hd).transpose(1, 2)

        def on_k(module, args, out):
            B, N, _ = out.shape
            fn(box.pop("q", None), out.reshape(B, N, heads, hd).transpose(1, 2), scale)
        if want_q:
            self.hooks.post(a.q_proj, on_q)
        self.hooks.post(a.k_proj, on_k)

    def add_attention_bias(self, i, bias_fn):
        def check(attn):
            impl = getattr(getattr(attn, "config", None), "_attn_implementation", None) or "eager"
            if impl not in ("eager", "sdpa"):
                # flex's score_mod indexes the mask per query and flash takes no float mask at all
                raise SiteError(f"proportional attention (a merged token's log(size) added to the attention "
                                f"logits) needs attn_implementation 'sdpa' or 'eager'; this tower uses {impl!r}")
        check(self._attn(i))

        def hook(module, args, kwargs):
            bias = bias_fn()
            if bias is None:
                return None
            check(module)  # set_attn_implementation() after reduce() changes it under the hook
            hs = args[0] if args else kwargs["hidden_states"]
            kwargs = dict(kwargs)
            mask = kwargs.get("attention_mask")
            if mask is None and len(args) > 1:
                mask, args = args[1], args[:1]
            kwargs["attention_mask"] = merge_bias(mask, bias, hs.dtype)
            return args, kwargs
        self.hooks.pre(self._attn(i), hook, with_kwargs=True)
