"""The embedded video-QA model: a few-million-parameter LLaVA-OneVision trained on the synthetic
clips of `synthetic.py`, shipped with the package so evaluation and demos run offline.

It is built from the classes real checkpoints use (LlavaOnevisionForConditionalGeneration =
SigLIP vision tower + 2-layer projector + Qwen2 decoder), so every tokenreduce site and reducer
that works on LLaVA-OneVision-0.5B works on it unchanged. A word-level tokenizer covers the
synthetic questions. `EmbeddedProcessor` plays the role of an HF processor:

    model, processor = load_embedded()
    inputs = processor(text=processor.prompt(question, options), videos=[frames])  # frames (T, H, W, 3) uint8
    logits = model(**inputs).logits[:, -1]         # the answer is the next word

Images are treated as one-frame videos (so `VLMScorer(model, processor)` works: the model was
also trained to answer "Does this frame help answer the question: ...? Answer True or False.").
Weights: eval/assets/embedded_videoqa/ (model.safetensors + config.json + tokenizer.json),
reproduced by `python -m tokenreduce.eval.train_embedded`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .synthetic import COLOR_NAMES, MOMENTS, NUMBERS, QUADRANTS, SHAPES

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "embedded_videoqa"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<image>", "<video>"]
LETTERS = ["A", "B", "C", "D", "E"]
RELEVANCE_PROMPT = "Does this frame help answer the question: {question}? Answer True or False."
_WORDS = ("what colour is the shape in at which appears first where how many are there cross "
          "user options answer USER ASSISTANT Does this frame help question Answer True or False "
          "- : ? . , top bottom left right")


def vocabulary() -> list:
    words = set(_WORDS.split()) | set(COLOR_NAMES) | set(SHAPES) | {s + "s" for s in SHAPES} | set(NUMBERS)
    words |= set(MOMENTS) | set(LETTERS) | set(QUADRANTS)
    return SPECIAL_TOKENS + sorted(words)


def build_tokenizer():
    """word-level fast tokenizer; <image>/<video> are special tokens matched before splitting"""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # hyphenated answers ("top-left") stay one token, so every answer is one next-token prediction
    tk.add_tokens([AddedToken(q, normalized=False) for q in QUADRANTS])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
                                   padding_side="left")


DEFAULT_SIZES = dict(image_size=64, patch_size=8, vision_hidden=128, vision_layers=3, vision_heads=4,
                     text_hidden=192, text_layers=4, text_heads=6, text_kv_heads=2)


def build_config(tokenizer, **sizes):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"unknown size(s) {sorted(unknown)}; valid: {', '.join(DEFAULT_SIZES)}")
    z = {**DEFAULT_SIZES, **sizes}
    vision = SiglipVisionConfig(image_size=z["image_size"], patch_size=z["patch_size"], hidden_size=z["vision_hidden"],
                                intermediate_size=4 * z["vision_hidden"], num_hidden_layers=z["vision_layers"],
                                num_attention_heads=z["vision_heads"], vision_use_head=False)
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=z["text_hidden"], intermediate_size=3 * z["text_hidden"],
                       num_hidden_layers=z["text_layers"], num_attention_heads=z["text_heads"],
                       num_key_value_heads=z["text_kv_heads"], max_position_embeddings=2048, tie_word_embeddings=True,
                       rope_theta=10000.0, pad_token_id=tokenizer.pad_token_id)
    return LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
                                vision_feature_layer=-1, vision_feature_select_strategy="full",
                                tie_word_embeddings=True)


def config_sizes(config) -> dict:
    """The DEFAULT_SIZES keys of a built (or loaded) model's config"""
    v, t = config.vision_config, config.text_config
    return dict(image_size=v.image_size, patch_size=v.patch_size, vision_hidden=v.hidden_size,
                vision_layers=v.num_hidden_layers, vision_heads=v.num_attention_heads, text_hidden=t.hidden_size,
                text_layers=t.num_hidden_layers, text_heads=t.num_attention_heads, text_kv_heads=t.num_key_value_heads)


def tokens_per_frame(config) -> int:
    g = config.vision_config.image_size // config.vision_config.patch_size
    return (-(-g // 2)) ** 2  # LLaVA-OneVision pools each frame 2x2 (bilinear) before the LLM


class EmbeddedProcessor:
    """Turns (text with one <video> or <image> placeholder, frames) into model inputs.

    videos: list of (T, H, W, 3) uint8 arrays (or one array); images: list of (H, W, 3) arrays,
    each taken as a one-frame video. The placeholder is expanded to T * tokens_per_frame + 1 video
    tokens (the +1 is the model's image_newline); batches are left-padded. Frames are resized to
    the model's image size when they differ and normalised with mean = std = 0.5.
    """

    image_token = "<image>"
    video_token = "<video>"
    chat_template = None
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)

    def __init__(self, tokenizer, config):
        self.tokenizer = tokenizer
        self.config = config
        self.size = config.vision_config.image_size
        self.tokens_per_frame = tokens_per_frame(config)

    @staticmethod
    def prompt(question: str, options) -> str:
        """the training prompt: the video, the question, lettered options, 'answer :'"""
        opts = " ".join(f"{LETTERS[i]} {o}" for i, o in enumerate(options))
        return f"<video> user {question} options : {opts} answer :"

    def pixels(self, frames: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(frames))
        if x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected frames of shape (T, H, W, 3), got {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                                align_corners=False, antialias=True)
        return (x - 0.5) / 0.5

    def __call__(self, text=None, videos=None, images=None, return_tensors="pt", padding=True, **_):
        if text is None:
            raise ValueError("EmbeddedProcessor needs text= (with one <video> or <image> placeholder)")
        texts = [text] if isinstance(text, str) else list(text)
        if images is not None:
            imgs = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
            videos = [np.asarray(im)[None] for im in imgs]
        if videos is None:
            raise ValueError("EmbeddedProcessor needs videos= or images=")
        if isinstance(videos, np.ndarray) and videos.ndim == 4:
            videos = [videos]
        videos = list(videos)
        if len(videos) != len(texts):
            raise ValueError(f"got {len(texts)} texts and {len(videos)} videos")
        T = {len(v) for v in videos}
        if len(T) != 1:
            raise ValueError(f"all videos of a batch need the same number of frames, got {sorted(T)}")
        T = T.pop()
        ids = []
        for t in texts:
            t = t.replace(self.image_token, self.video_token)
            if t.count(self.video_token) != 1:
                raise ValueError(f"text needs exactly one {self.video_token} (or {self.image_token}) placeholder: {t!r}")
            before, after = t.split(self.video_token)
            enc = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"] if s.strip() else []
            ids.append(enc(before) + [self.config.video_token_id] * (T * self.tokens_per_frame + 1) + enc(after))
        L = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), L), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), L), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, L - len(x):] = torch.tensor(x)
            mask[i, L - len(x):] = 1
        return dict(input_ids=input_ids, attention_mask=mask,
                    pixel_values_videos=torch.stack([self.pixels(v) for v in videos]))

    def decode(self, ids, **kw) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, **kw).strip()

    batch_decode = lambda self, seqs, **kw: [self.decode(s, **kw) for s in seqs]


def build_model(config, seed: int = 0):
    from transformers import LlavaOnevisionForConditionalGeneration
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(config)


def load_embedded(path=None, device="cpu", dtype=torch.float32, attn_implementation: str = "sdpa"):
    """(model, processor) of the shipped trained model (or a directory written by train_embedded)."""
    from transformers import LlavaOnevisionForConditionalGeneration, PreTrainedTokenizerFast
    path = Path(path) if path is not None else ASSET_DIR
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no embedded model at {str(path)!r} (model.safetensors missing); "
                                "train one with python -m tokenreduce.eval.train_embedded --out DIR")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(str(path), dtype=dtype,
                                                                   attn_implementation=attn_implementation)
    model = model.to(device).eval()
    return model, EmbeddedProcessor(tokenizer, model.config)


def embedded_info(path=None) -> dict:
    path = Path(path) if path is not None else ASSET_DIR
    info = path / "training.json"
    return json.loads(info.read_text()) if info.exists() else {}
