"""Hugging Face VideoMAE: VideoMAEModel and VideoMAEForVideoClassification (its `.videomae`).

A plain pre-norm ViT over tubelet tokens, so it reuses the generic ViT machinery (adapters/vit.py):
  frames            before the encoder, on the pixel video's frame axis (frame selection)
  vision.layer.{i}  before block i (STA runs at vision.layer.{1, depth/3+1, 2*depth/3+1})
  vision.block.{i}  inside block i, after attention + residual, before the MLP (ToMe)
  vision.out        the final tokens, before mean pooling

Layout: no CLS token (num_prefix 0). The Conv3d tubelet embedding gives the grid (T', H', W')
(16 frames with tubelet 2 at 224 / patch 16: (8, 14, 14) = 1568 tokens); the stream's `frame`
field says which temporal slot each token belongs to. Sinusoidal position embeddings are added
once at the input, so tokens may be reordered and pruned freely inside the encoder.

Details of this family:
* Signals: keys averaged over heads come from a hook on each self-attention's `key` Linear
  (fused SDPA stays on). No CLS, so no `cls_attn`.
* ToMe proportional attention: VideoMAE's attention forward accepts no mask, so the log(size)
  bias goes through transformers' AttentionInterface: a function registered under
  "tokenreduce_bias" adds the bias as a float mask and calls the model's own implementation
  (sdpa / eager / ...). It is selected per attention module by giving that module (instance
  attribute, restored by remove()) a shallow copy of the config naming it. Nothing global changes.
* The `vision.block.{i}` split: VideoMAE adds the MLP residual inside `layer.output`; the MLP
  branch's last module is `layer.output.dropout`, so the generic three-hook scheme applies.
* Pooling: VideoMAEForVideoClassification averages all tokens before `fc_norm`. With merged
  tokens that mean is size-weighted (sum size * x / sum size, ToMe's MAE rule); with pruned
  tokens it is the plain mean over survivors (as the STA reference does).
* Frame count: the sinusoidal position table is fixed to config.num_frames (a 1-D table over
  the flattened (T', H', W') index, which cannot be meaningfully interpolated in time). The
  `frames` site therefore must leave exactly config.num_frames frames; otherwise the forward
  fails with an error saying so. Typical use: feed a longer clip (e.g. 64 frames) and select
  `frame_select(k=16)`.
* TimeSformer does not fit this adapter: its divided space-time attention reshapes the tokens
  into (B*T, H*W) and (B*H*W, T) inside every block, so dropping arbitrary tokens breaks it.
  It is not supported (no site would be safe besides `frames`).
"""
from __future__ import annotations

import copy
import sys
import weakref

from tokenreduce.errors import SiteError
from tokenreduce.hooks import Recorder
from tokenreduce.registry import register_adapter

from .base import is_a
from .frames import FRAMES, frames_site_info, reduce_frames
from .vit import BlockParts, ViTAdapter, merge_bias, size_weighted_mean

_T = "transformers.models.videomae.modeling_videomae."
MODEL = _T + "VideoMAEModel"
CLASSIFIER = _T + "VideoMAEForVideoClassification"

BIAS_IMPL = "tokenreduce_bias"
_BIAS_ATTR = "_tokenreduce_attn"  # per attention instance: (base function, bias_fn)


def _bias_attention(module, query, key, value, attention_mask, **kwargs):
    """An AttentionInterface function: the module's own implementation plus an additive bias."""
    base, bias_fn = module.__dict__[_BIAS_ATTR]
    bias = bias_fn()
    if bias is not None:
        attention_mask = merge_bias(attention_mask, bias, query.dtype)
    return base(module, query, key, value, attention_mask, **kwargs)


def _register_bias_impl() -> None:
    from transformers import AttentionInterface
    if BIAS_IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(BIAS_IMPL, _bias_attention)


@register_adapter
class VideoMAEAdapter(ViTAdapter):
    name = "videomae"
    family = "transformers VideoMAE (VideoMAEModel, VideoMAEForVideoClassification)"
    priority = 10

    num_prefix = 0
    cls_index = None
    no_cls_note = "VideoMAE has no [CLS] token"

    @classmethod
    def matches(cls, model) -> bool:
        return is_a(model, MODEL, CLASSIFIER)

    def __init__(self, model):
        super().__init__(model)
        self.videomae = model.videomae if is_a(model, CLASSIFIER) else model
        self.layers = self.videomae.encoder.layer
        self.config = self.videomae.config
        self._frames_pending = None

    # -- parts ---------------------------------------------------------------------------------
    def blocks(self):
        return list(self.layers)

    def _self_attn(self, i):
        return self.layers[i].attention.attention

    def parts(self, i):
        layer = self.layers[i]
        return BlockParts(attn=layer.attention, mlp_in=layer.layernorm_after, mlp_out=layer.output.dropout)

    def patch_module(self):
        return self.videomae.embeddings.patch_embeddings.projection

    def out_module(self):
        vm = self.videomae
        return vm.layernorm if vm.layernorm is not None else vm.encoder

    def attn_dim(self, i):
        return self._self_attn(i).all_head_size

    # -- sites ---------------------------------------------------------------------------------
    def sites(self) -> dict:
        out = {FRAMES: frames_site_info()}
        out.update(super().sites())
        return out

    # -- signals / bias ------------------------------------------------------------------------
    def capture_qk(self, i, want_q, fn):
        a = self._self_attn(i)
        heads, hd = a.num_attention_heads, a.attention_head_size

        def on_k(module, args, out):
            B, N, _ = out.shape
            fn(None, out.reshape(B, N, heads, hd).transpose(1, 2), a.scaling)
        self.hooks.post(a.key, on_k)

    def add_attention_bias(self, i, bias_fn):
        a = self._self_attn(i)
        _register_bias_impl()
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        impl = a.config._attn_implementation
        if impl == BIAS_IMPL:  # already routed (should not happen: remove() restores the config)
            return
        eager = getattr(sys.modules[type(a).__module__], "eager_attention_forward")
        base = eager if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
        cfg = copy.copy(a.config)
        cfg._attn_implementation = BIAS_IMPL
        self.hooks.setattr(a, _BIAS_ATTR, (base, bias_fn))
        self.hooks.setattr(a, "config", cfg)

    # -- install -------------------------------------------------------------------------------
    def install(self, stages, recorder) -> None:
        self._frame_stages = [red for name, red in stages if name == FRAMES]
        token_stages = [(n, r) for n, r in stages if n != FRAMES]
        if token_stages and is_a(self.model, CLASSIFIER) and getattr(self.model, "fc_norm", None) is None:
            raise SiteError("videomae: this classifier (use_mean_pooling=False) reads its first token, which token "
                            f"sites would drop or move ({', '.join(n for n, _ in token_stages)}); only the frames "
                            "site runs on it")
        super().install(token_stages, recorder)
        if self._frame_stages:
            self.hooks.pre(self.videomae.embeddings, self._on_frames, with_kwargs=True)
        elif token_stages:
            self.hooks.pre(self.videomae.embeddings, self._refuse_mask, with_kwargs=True)

    @staticmethod
    def _refuse_mask(module, args, kwargs):
        if (args[1] if len(args) > 1 else kwargs.get("bool_masked_pos")) is not None:
            raise SiteError("videomae: token sites cannot run on a bool_masked_pos input (MAE pre-training masks): "
                            "the visible tokens are not the video's grid; drop the mask or the reduction")
        return None

    def install_extra(self):
        if is_a(self.model, CLASSIFIER) and getattr(self.model, "fc_norm", None) is not None:
            self.hooks.pre(self.model.fc_norm, self._weighted_mean_pool)

    def _on_frames(self, module, args, kwargs):
        pix = args[0] if args else kwargs.get("pixel_values")
        masked = args[1] if len(args) > 1 else kwargs.get("bool_masked_pos")
        if masked is not None:
            raise SiteError("videomae: the frames site cannot run together with bool_masked_pos "
                            "(MAE pre-training masks); drop the frames stage or the mask")
        scratch = Recorder()
        scratch.begin()
        new, kept = reduce_frames(pix, 1, self._frame_stages, self.context, self._infos, scratch)
        self._frames_pending = scratch.last
        nf = int(self.config.num_frames)
        if new is None:  # nothing selected: the clip must already have the model's frame count
            if pix.shape[1] != nf:
                raise SiteError(f"videomae: the clip has {pix.shape[1]} frames and the frames site kept them all, "
                                f"but this VideoMAE takes exactly config.num_frames={nf}; give at least {nf} frames")
            return None
        if new.shape[1] != nf:
            raise SiteError(f"videomae: the frames site kept {new.shape[1]} frames but this VideoMAE takes exactly "
                            f"config.num_frames={nf} (its sinusoidal position table is fixed); select "
                            f"k={nf} frames from a longer clip")
        self._frames_pending.extra["kept_frames"] = kept
        if args:
            return (new,) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["pixel_values"] = new
        return args, kwargs

    def _begin(self, x):
        pending, self._frames_pending = self._frames_pending, None
        super()._begin(x)
        if pending is not None:  # the frames site ran before this pass began: keep its record
            rec = self.recorder.last
            rec.sites = {**pending.sites, **rec.sites}
            rec.trace = {**pending.trace, **rec.trace}
            rec.extra.update(pending.extra)

    # -- pooling -------------------------------------------------------------------------------
    def _weighted_mean_pool(self, module, args):
        tokens = self._final_x() if self._final_x is not None else None
        size = None if tokens is None else self.merged_sizes(tokens)
        if size is None or tokens.shape[0] != args[0].shape[0]:
            return None
        return (size_weighted_mean(tokens, size),)

    def _on_out(self, module, args, output):
        from .vit import read_tokens
        res = super()._on_out(module, args, output)
        self._final_x = weakref.ref(read_tokens(output if res is None else res))  # see TimmViTAdapter
        return res
