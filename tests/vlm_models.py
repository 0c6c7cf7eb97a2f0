"""Tiny LLaVA-family models built from configs with the real transformers classes, plus inputs:
a left-padded batch of 2 and the same two samples alone."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

IMG, VID, PAD = 100, 101, 0


def _llama(vocab=128):
    import transformers as tf
    return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, pad_token_id=PAD)


def _qwen2(vocab=128):
    import transformers as tf
    return tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, pad_token_id=PAD)


def _clip(size=28, layers=3):
    import transformers as tf
    return tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                               image_size=size, patch_size=7)


def _siglip(size=28):
    import transformers as tf
    return tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=size, patch_size=7)


@dataclass
class VLMCase:
    name: str
    model: object
    batch: dict                         # left-padded batch of 2
    singles: list = field(default_factory=list)  # each sample alone (no padding)
    visual: int = 0                     # placeholder tokens per sample (unreduced)
    video: bool = False


def _pad_rows(rows, extra=None):
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):] = 1
    return ids, mask


def _prompts(n_vis, token, tails=((8, 9, 10, 11, 12), (8, 9, 10))):
    return [[5, 6, 7] + [token] * n_vis + list(t) for t in tails]


def _finish(name, model, rows, pix_key, pix, token_types=None, extra=None, video=False, n_vis=0):
    ids, mask = _pad_rows(rows)
    batch = {"input_ids": ids, "attention_mask": mask, pix_key: pix}
    if extra:
        batch.update(extra)
    singles = []
    for i, r in enumerate(rows):
        s = {"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, len(r), dtype=torch.long)}
        s[pix_key] = pix[i:i + 1] if pix.dim() > 2 else pix  # qwen2-vl pixels are flat patches
        if extra:
            for k, v in extra.items():
                s[k] = v[i:i + 1]
        singles.append(s)
    if token_types is not None:
        batch["mm_token_type_ids"], _ = _pad_rows([[token_types.get(t, 0) for t in r] for r in rows])
        for i, r in enumerate(rows):
            singles[i]["mm_token_type_ids"] = torch.tensor([[token_types.get(t, 0) for t in r]])
    return VLMCase(name, model, batch, singles, n_vis, video)


def llava(attn="sdpa"):
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlavaConfig(vision_config=_clip(), text_config=_llama(), image_token_index=IMG, image_seq_length=16)
    m = tf.LlavaForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    pix = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    return _finish("llava", m, _prompts(16, IMG), "pixel_values", pix, n_vis=16)


def llava_next(attn="sdpa"):
    import transformers as tf
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    torch.manual_seed(0)
    cfg = tf.LlavaNextConfig(vision_config=_clip(), text_config=_llama(), image_token_index=IMG,
                             image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
    m = tf.LlavaNextForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    sizes = torch.tensor([[28, 56], [28, 56]])
    n = image_size_to_num_patches((28, 56), cfg.image_grid_pinpoints, 28)
    pix = torch.randn(2, n, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        n_vis = m.model.get_image_features(pixel_values=pix[:1], image_sizes=sizes[:1]).pooler_output[0].shape[0]
    return _finish("llava_next", m, _prompts(n_vis, IMG), "pixel_values", pix, extra={"image_sizes": sizes},
                   n_vis=n_vis)


def llava_onevision(attn="sdpa"):
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlavaOnevisionConfig(vision_config=_siglip(), text_config=_qwen2(), image_token_index=IMG,
                                  video_token_index=VID, vision_feature_select_strategy="full")
    m = tf.LlavaOnevisionForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    video = torch.randn(2, 4, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        n_vis = m.model.get_video_features(pixel_values_videos=video[:1]).pooler_output.shape[1]
    return _finish("llava_onevision", m, _prompts(n_vis, VID), "pixel_values_videos", video, video=True,
                   n_vis=n_vis)


def llava_next_video(attn="sdpa"):
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlavaNextVideoConfig(vision_config=_clip(), text_config=_llama(), image_token_index=IMG,
                                  video_token_index=VID, image_grid_pinpoints=[[28, 56], [56, 28]],
                                  spatial_pool_stride=2)
    m = tf.LlavaNextVideoForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    video = torch.randn(2, 4, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = m.model.get_video_features(pixel_values_videos=video[:1]).pooler_output
        n_vis = sum(f.shape[0] for f in feats) if isinstance(feats, (list, tuple)) else feats.shape[1]
    return _finish("llava_next_video", m, _prompts(n_vis, VID), "pixel_values_videos", video, video=True,
                   n_vis=n_vis)


def _mrope_text(config_class):
    """the Qwen-VL decoder config: 4 layers, M-RoPE sections (t, h, w) = (2, 1, 1) of head_dim 8"""
    return config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512,
                        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0})


def qwen2_vl(attn="sdpa"):
    import transformers as tf
    torch.manual_seed(0)
    text = _mrope_text(tf.Qwen2VLTextConfig)
    vision = tf.Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=14,
                                    spatial_merge_size=2, temporal_patch_size=2)
    cfg = tf.Qwen2VLConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=IMG,
                           video_token_id=VID, vision_start_token_id=20, vision_end_token_id=21)
    m = tf.Qwen2VLForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    pix = torch.randn(32, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    n_vis = 4
    rows = [[5, 6, 20] + [IMG] * n_vis + [21] + list(t) for t in ((8, 9, 10, 11, 12), (8, 9, 10))]
    case = _finish("qwen2_vl", m, rows, "pixel_values", pix, token_types={IMG: 1}, n_vis=n_vis)
    case.batch["image_grid_thw"] = grid
    for i, s in enumerate(case.singles):
        s["pixel_values"] = pix[16 * i:16 * (i + 1)]
        s["image_grid_thw"] = grid[i:i + 1]
    return case


def qwen2_5_vl(attn="sdpa"):
    """Qwen2.5-VL on video: flat patches, (t, h, w) grids of 2 temporal patches, and the seconds per
    temporal patch that space its M-RoPE time positions (second_per_grid_ts)"""
    import transformers as tf
    torch.manual_seed(0)
    text = _mrope_text(tf.Qwen2_5_VLTextConfig)
    vision = tf.Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14,
                                       spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                                       window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)
    cfg = tf.Qwen2_5_VLConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=IMG,
                              video_token_id=VID, vision_start_token_id=20, vision_end_token_id=21)
    m = tf.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    grid = torch.tensor([[2, 4, 4], [2, 4, 4]])
    pix = torch.randn(64, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    seconds = torch.tensor([1.0, 2.0])  # the two clips at different frame rates
    n_vis = 8
    rows = [[5, 6, 20] + [VID] * n_vis + [21] + list(t) for t in ((8, 9, 10, 11, 12), (8, 9, 10))]
    case = _finish("qwen2_5_vl", m, rows, "pixel_values_videos", pix, token_types={VID: 2}, video=True, n_vis=n_vis)
    case.batch.update(video_grid_thw=grid, second_per_grid_ts=seconds)
    for i, s in enumerate(case.singles):
        s.update(pixel_values_videos=pix[32 * i:32 * (i + 1)], video_grid_thw=grid[i:i + 1],
                 second_per_grid_ts=seconds[i:i + 1])
    return case


def qwen3_vl(attn="sdpa"):
    """Qwen3-VL on images of 4x8 patches (8 tokens): interleaved M-RoPE, and DeepStack features
    of vision blocks 0-2 added to the visual tokens after decoder layers 0, 1 and 2"""
    import transformers as tf
    torch.manual_seed(0)
    text = tf.Qwen3VLTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8, vocab_size=128, max_position_embeddings=512,
                                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                 "rope_theta": 10000.0, "mrope_interleaved": True})
    vision = tf.Qwen3VLVisionConfig(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14,
                                    spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                                    num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2])
    cfg = tf.Qwen3VLConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=IMG,
                           video_token_id=VID, vision_start_token_id=20, vision_end_token_id=21)
    m = tf.Qwen3VLForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    grid = torch.tensor([[1, 4, 8], [1, 4, 8]])
    pix = torch.randn(64, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    rows = [[5, 6, 20] + [IMG] * 8 + [21] + list(t) for t in ((8, 9, 10, 11, 12), (8, 9, 10))]
    case = _finish("qwen3_vl", m, rows, "pixel_values", pix, token_types={IMG: 1}, n_vis=8)
    case.batch["image_grid_thw"] = grid
    for i, s in enumerate(case.singles):
        s.update(pixel_values=pix[32 * i:32 * (i + 1)], image_grid_thw=grid[i:i + 1])
    return case


def internvl(attn="sdpa"):
    """InternVL: its own ViT (CLS dropped), pixel shuffle 16 -> 4 tokens, a Qwen2 decoder"""
    import transformers as tf
    torch.manual_seed(0)
    vision = tf.InternVLVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     image_size=28, patch_size=7)
    cfg = tf.InternVLConfig(vision_config=vision.to_dict(), text_config=_qwen2().to_dict(), image_token_id=IMG,
                            image_seq_length=4)
    m = tf.InternVLForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    pix = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    return _finish("internvl", m, _prompts(4, IMG), "pixel_values", pix, n_vis=4)


def gemma3(attn="sdpa"):
    """Gemma 3: SigLIP, average-pooled to 4 tokens, image tokens attending to each other both ways
    (token_type_ids), and a decoder whose layers 0 and 2 use a sliding window of 6 tokens: shorter
    than the prompts, so the window matters at prefill and at every decode step"""
    import transformers as tf
    torch.manual_seed(0)
    text = tf.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, vocab_size=128, max_position_embeddings=512,
                               sliding_window=6, query_pre_attn_scalar=8, pad_token_id=PAD,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                            "full_attention"])
    cfg = tf.Gemma3Config(text_config=text.to_dict(), vision_config=_siglip(28).to_dict(), mm_tokens_per_image=4,
                          image_token_index=IMG, boi_token_index=20, eoi_token_index=21)
    m = tf.Gemma3ForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    pix = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    rows = [[5, 6, 20] + [IMG] * 4 + [21] + list(t) for t in ((8, 9, 10, 11, 12), (8, 9, 10))]
    case = _finish("gemma3", m, rows, "pixel_values", pix, n_vis=4)
    case.batch["token_type_ids"] = (case.batch["input_ids"] == IMG).long()
    for s in case.singles:
        s["token_type_ids"] = (s["input_ids"] == IMG).long()
    return case


def mistral3(attn="sdpa"):
    """Mistral 3: Pixtral tower (2-D RoPE, image_sizes), 2x2 patch merger, a Mistral decoder"""
    import transformers as tf
    torch.manual_seed(0)
    vision = tf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=56, patch_size=14, head_dim=8)
    text = tf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, pad_token_id=PAD,
                            sliding_window=None)
    cfg = tf.Mistral3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMG,
                            spatial_merge_size=2)
    m = tf.Mistral3ForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    pix = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    return _finish("mistral3", m, _prompts(4, IMG), "pixel_values", pix, n_vis=4,
                   extra={"image_sizes": torch.tensor([[56, 56], [56, 56]])})


def paligemma(attn="sdpa"):
    """PaliGemma: the image first, then a prefix the model reads both ways (token_type_ids 0) and
    a suffix (1)"""
    import transformers as tf
    torch.manual_seed(0)
    text = tf.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, vocab_size=128, max_position_embeddings=512,
                          pad_token_id=PAD)
    cfg = tf.PaliGemmaConfig(vision_config=_siglip(28).to_dict(), text_config=text.to_dict(), image_token_index=IMG,
                             projection_dim=32)
    m = tf.PaliGemmaForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    pix = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    rows = [[IMG] * 16 + [5, 6] + list(t) for t in ((8, 9, 10, 11, 12), (8, 9, 10))]
    case = _finish("paligemma", m, rows, "pixel_values", pix, n_vis=16)
    case.batch["token_type_ids"] = torch.zeros_like(case.batch["input_ids"])
    for s in case.singles:
        s["token_type_ids"] = torch.zeros_like(s["input_ids"])
    return case


def aya_vision(attn="sdpa"):
    """Aya Vision: SigLIP, pixel-shuffle 16 -> 4 tokens, a Cohere 2 decoder (sliding window 6 in
    three of its four layers)"""
    import transformers as tf
    torch.manual_seed(0)
    text = tf.Cohere2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, pad_token_id=PAD,
                            sliding_window=6)
    cfg = tf.AyaVisionConfig(vision_config=_siglip(28).to_dict(), text_config=text.to_dict(), image_token_index=IMG,
                             downsample_factor=2, adapter_layer_norm_eps=1e-5)
    m = tf.AyaVisionForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    pix = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    return _finish("aya_vision", m, _prompts(4, IMG), "pixel_values", pix, n_vis=4)


BUILDERS = {"llava": llava, "llava_next": llava_next, "llava_onevision": llava_onevision,
            "llava_next_video": llava_next_video, "qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl,
            "internvl": internvl, "gemma3": gemma3, "mistral3": mistral3, "aya_vision": aya_vision,
            "paligemma": paligemma}
