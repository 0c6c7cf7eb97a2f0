"""Shared fixtures: tiny models built from configs with the classes real checkpoints use."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tokenreduce import Plan, Reducer, register_reducer  # noqa: E402

# Tiny models: one intra-op thread is fastest, and keeps the suite steady on a busy 2-core machine.
torch.set_num_threads(1)


@register_reducer
@dataclass
class KeepAll(Reducer):
    """Test reducer: a real plan that keeps every token (merge=True: an identity merge plan).

    It makes the adapters run their whole reduction path while nothing should change."""

    name = "keep_all_test"
    summary = "test only"
    merge: bool = False

    def plan(self, stream):
        p = Plan.keep_all(stream)
        if self.merge:
            p.assign = torch.arange(stream.num_tokens, device=stream.pos.device).expand_as(stream.pos).clone()
        return p


@register_reducer
@dataclass
class DropLast(Reducer):
    """Test reducer: drop the last `n` visual tokens (a deterministic, score-free plan)."""

    name = "drop_last_test"
    summary = "test only"
    n: int = 1

    def plan(self, stream):
        vis = stream.visual
        keep_mask = vis.clone()
        idx = torch.nonzero(vis[0]).squeeze(1)[-self.n:]
        keep_mask[:, idx] = False
        keep_mask |= ~vis
        return Plan.from_mask(keep_mask)


def _timm(name, **kw):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw).eval()


def _open_clip_small():
    pytest.importorskip("open_clip")
    torch.manual_seed(0)
    # the tower class ViT-B-32 uses, at a small width
    from open_clip.transformer import VisionTransformer
    return VisionTransformer(image_size=64, patch_size=16, width=64, layers=3, heads=4, mlp_ratio=4.0,
                             output_dim=32).eval()


def _hf(kind):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                  image_size=32, patch_size=8)
    if kind == "clip":
        return tf.CLIPVisionModel(tf.CLIPVisionConfig(**common)).eval()
    if kind == "siglip":
        return tf.SiglipVisionModel(tf.SiglipVisionConfig(**common)).eval()
    if kind == "dinov2":
        c = dict(common)
        c.pop("intermediate_size")
        return tf.Dinov2Model(tf.Dinov2Config(**c, mlp_ratio=2)).eval()
    raise ValueError(kind)


@dataclass
class VitCase:
    name: str
    build: object
    image: int
    has_cls: bool = True
    num_prefix: int = 1

    def inputs(self, batch=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, self.image, self.image, generator=g)

    def run(self, model, x):
        with torch.no_grad():
            out = model(x) if not hasattr(model, "config") else model(pixel_values=x)
        if torch.is_tensor(out):
            return out
        return torch.cat([out.last_hidden_state.flatten(1)] + (
            [out.pooler_output.flatten(1)] if getattr(out, "pooler_output", None) is not None else []), 1)


# timm-style: one list of every ViT family the adapters support, small sizes
VIT_CASES = [
    VitCase("timm_vit_tiny", lambda: _timm("vit_tiny_patch16_224", img_size=64), 64),
    VitCase("timm_deit_tiny_distilled", lambda: _timm("deit_tiny_distilled_patch16_224", img_size=64), 64,
            num_prefix=2),
    VitCase("timm_deit3_small_layerscale", lambda: _timm("deit3_small_patch16_224", img_size=64, depth=4), 64),
    VitCase("timm_vit_reg4_gap", lambda: _timm("vit_base_patch16_reg4_gap_256", img_size=64, embed_dim=64,
                                                 depth=3, num_heads=4), 64, has_cls=False, num_prefix=4),
    VitCase("timm_vit_qknorm", lambda: _timm("vit_tiny_patch16_224", img_size=64, depth=4, qk_norm=True), 64),
    VitCase("open_clip_vit_b32_small", _open_clip_small, 64),
    VitCase("hf_clip", lambda: _hf("clip"), 32),
    VitCase("hf_siglip", lambda: _hf("siglip"), 32, has_cls=False, num_prefix=0),
    VitCase("hf_dinov2", lambda: _hf("dinov2"), 32),
]


@pytest.fixture(params=VIT_CASES, ids=lambda c: c.name)
def vit_case(request):
    return request.param
