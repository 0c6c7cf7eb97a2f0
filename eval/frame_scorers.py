"""Frame scorers for `frame_select` (Hu et al., CVPR 2025, arXiv:2502.19680).

A scorer is called as scorer(pixels, questions, k=None) -> (B, T) float scores, higher = more
useful for answering; pixels is (B, T, C, H, W), questions a list of B strings or None.
Registered by name (entry-point group `tokenreduce.scorers`):

  uniform  no model: peaks at round(linspace(0, T-1, k)), so the selection is uniform sampling
  clip     CLIP zero-shot: cosine similarity of each frame to the question (open_clip); the
           paper's "CLIP similarity" ablation row
  vlm      p(True) / (p(True) + p(False)) of any HF LLaVA-family model asked about each frame
           alone, as the paper's spatial pseudo-labels (Qwen2-VL-7B there)
  head     a small trained selector head (FrameSelectorHead, trained by
           `python -m tokenreduce.eval.train_frame_selector`)

Pixel domain. At a model's `frames` site the scorer sees the tensor the model receives, which
a processor has usually normalised: give the scorer that processor's `pixel_mean` /
`pixel_std` (e.g. processor.image_mean / image_std) so it can recover [0, 1] pixels. Without
them, uint8 input is divided by 255 and float input is taken as [0, 1] already (what
`select_frames` passes).

Heavy libraries (open_clip, transformers, safetensors) are imported only when a scorer that
needs them is built.
"""
from __future__ import annotations

import json
import math
import re
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenreduce.registry import register_scorer

from .video import uniform_indices

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def to_unit(pixels: Tensor, mean=None, std=None) -> Tensor:
    """(..., C, H, W) pixels -> float in [0, 1] (undoing a processor's normalisation if given)."""
    if pixels.dtype == torch.uint8:
        return pixels.float() / 255.0
    x = pixels.float()
    if mean is not None or std is not None:
        C = x.shape[-3]
        m = torch.as_tensor(mean if mean is not None else [0.0] * C, dtype=x.dtype, device=x.device)
        s = torch.as_tensor(std if std is not None else [1.0] * C, dtype=x.dtype, device=x.device)
        x = x * s.view(C, 1, 1) + m.view(C, 1, 1)
    return x.clamp(0.0, 1.0)


def _need_questions(name: str, questions, B: int) -> list:
    if questions is None:
        raise ValueError(f"the {name} frame scorer needs a question: set handle.context['question'] "
                         "(one string per sample), frame_select(query=...), or pass it to select_frames")
    if isinstance(questions, str):
        questions = [questions] * B
    questions = list(questions)
    if len(questions) != B:
        raise ValueError(f"{name} scorer: got {len(questions)} questions for a batch of {B}")
    return questions


# -- uniform ----------------------------------------------------------------------------------------
@register_scorer("uniform")
class UniformScorer:
    """Scores that make greedy suppression return uniform sampling: 1 at round(linspace(0, T-1, k)),
    0 elsewhere (the uniform frames are always more than delta = int(T / 4k) apart)."""

    def __call__(self, pixels: Tensor, questions=None, k: int | None = None) -> Tensor:
        B, T = pixels.shape[:2]
        if k is None:
            raise ValueError("the uniform scorer needs k (the number of frames to keep)")
        s = torch.zeros(B, T)
        s[:, torch.as_tensor(uniform_indices(T, min(int(k), T)))] = 1.0
        return s


# -- CLIP ---------------------------------------------------------------------------------------------
@register_scorer("clip")
class ClipScorer:
    """CLIP zero-shot frame relevance: cosine(image embedding, question embedding).

    model: an open_clip CLIP model instance, or a model name ("ViT-B-32") built with
    `pretrained` (a tag or a local checkpoint path; None = random weights, for tests).
    tokenizer: open_clip tokenizer (default: open_clip.get_tokenizer(name), or the default
    tokenizer for an instance). pixel_mean / pixel_std: the normalisation of the incoming pixels.
    Frames are resized to the model's image size and normalised with the model's own statistics.
    """

    def __init__(self, model="ViT-B-32", pretrained=None, tokenizer=None, pixel_mean=None, pixel_std=None,
                 device=None, batch_size: int = 64):
        import open_clip
        if isinstance(model, str):
            name = model
            if pretrained is None:
                warnings.warn(f"clip scorer: {name} is built without pretrained weights (random), so its frame "
                              "scores are meaningless; pass pretrained= (an open_clip tag or a local checkpoint)",
                              stacklevel=2)
            model = open_clip.create_model(name, pretrained=pretrained)
            tokenizer = tokenizer or open_clip.get_tokenizer(name)
        elif not isinstance(model, nn.Module) or not hasattr(model, "encode_image"):
            raise TypeError(f"clip scorer: model must be an open_clip model name or a CLIP model instance, got {model!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer or open_clip.get_tokenizer("ViT-B-32")
        vis = model.visual
        size = getattr(vis, "image_size", 224)
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.mean = tuple(getattr(vis, "image_mean", None) or OPENAI_MEAN)
        self.std = tuple(getattr(vis, "image_std", None) or OPENAI_STD)
        self.pixel_mean, self.pixel_std = pixel_mean, pixel_std
        self.device = device
        self.batch_size = int(batch_size)

    def _dev(self):
        return self.device or next(self.model.parameters()).device

    @torch.no_grad()
    def image_features(self, pixels: Tensor) -> Tensor:
        B, T = pixels.shape[:2]
        x = to_unit(pixels.flatten(0, 1), self.pixel_mean, self.pixel_std)
        x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        m = torch.tensor(self.mean).view(1, -1, 1, 1)
        s = torch.tensor(self.std).view(1, -1, 1, 1)
        x = ((x - m) / s).to(self._dev())
        feats = torch.cat([self.model.encode_image(x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)])
        return F.normalize(feats.float(), dim=-1).reshape(B, T, -1)

    @torch.no_grad()
    def text_features(self, questions: list) -> Tensor:
        tok = self.tokenizer(questions).to(self._dev())
        return F.normalize(self.model.encode_text(tok).float(), dim=-1)

    def __call__(self, pixels: Tensor, questions=None, k: int | None = None) -> Tensor:
        q = _need_questions("clip", questions, pixels.shape[0])
        img = self.image_features(pixels)
        txt = self.text_features(q)
        return torch.einsum("btd,bd->bt", img, txt).cpu()


# -- VLM p(True) --------------------------------------------------------------------------------------
DEFAULT_VLM_PROMPT = "Does this frame help answer the question: {question}? Answer True or False."


@register_scorer("vlm")
class VLMScorer:
    """p(True) of a vision-language model asked about each frame alone (the paper's spatial labels).

    model: any Hugging Face LLaVA-family model (LlavaForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration, LlavaNextVideo..., Qwen2-VL, ...) whose forward
    takes the processor's outputs and returns next-token `logits`. processor: its processor
    (tokenizer + image processor). Each frame is asked `prompt` (with "{question}") through
    the processor's chat template when it has one ("USER: <image>\\n... ASSISTANT:" otherwise);
    score = p(True) / (p(True) + p(False)) from the last position's logits, where p(True) sums
    the first tokens of `true_token` written with and without a leading space (a BPE tokenizer
    answers " True" after "ASSISTANT:", "True" after a chat template's newline), and the same for
    `false_token`. One frame per forward, as the
    paper scores frames independently. The plain HF model is used; no tokenreduce adapter.
    """

    def __init__(self, model, processor, prompt: str = DEFAULT_VLM_PROMPT, true_token: str = "True",
                 false_token: str = "False", pixel_mean=None, pixel_std=None, use_chat_template: bool | None = None):
        if model is None or processor is None:
            raise ValueError("vlm scorer: give the HF model and its processor, e.g. "
                             "VLMScorer(model=LlavaOnevisionForConditionalGeneration..., processor=AutoProcessor...)")
        if "{question}" not in prompt:
            raise ValueError("vlm scorer: prompt must contain '{question}'")
        self.model = model.eval()
        self.processor = processor
        self.prompt = prompt
        self.pixel_mean, self.pixel_std = pixel_mean, pixel_std
        tok = getattr(processor, "tokenizer", processor)
        self.true_ids = sorted({self._first_id(tok, t) for t in (true_token, " " + true_token)})
        self.false_ids = sorted({self._first_id(tok, t) for t in (false_token, " " + false_token)})
        if set(self.true_ids) & set(self.false_ids):
            raise ValueError(f"vlm scorer: {true_token!r} and {false_token!r} start with the same token")
        if use_chat_template is None:
            use_chat_template = bool(getattr(processor, "chat_template", None))
        self.use_chat_template = use_chat_template

    @staticmethod
    def _first_id(tok, text):
        ids = tok.encode(text, add_special_tokens=False) if hasattr(tok, "encode") else tok(text)["input_ids"]
        if not ids:
            raise ValueError(f"vlm scorer: the tokenizer maps {text!r} to no token")
        return int(ids[0])

    def text(self, question: str) -> str:
        q = self.prompt.format(question=question.strip().rstrip("?"))
        if self.use_chat_template:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        image_token = getattr(self.processor, "image_token", "<image>")
        return f"USER: {image_token}\n{q} ASSISTANT:"

    @torch.no_grad()
    def score_frame(self, frame_hwc: np.ndarray, question: str) -> float:
        inputs = self.processor(images=frame_hwc, text=self.text(question), return_tensors="pt")
        dev = next(self.model.parameters()).device
        inputs = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        logits = self.model(**inputs).logits[0, -1].float()
        return float(torch.sigmoid(logits[self.true_ids].logsumexp(0) - logits[self.false_ids].logsumexp(0)))

    def __call__(self, pixels: Tensor, questions=None, k: int | None = None) -> Tensor:
        B, T = pixels.shape[:2]
        q = _need_questions("vlm", questions, B)
        frames = (to_unit(pixels, self.pixel_mean, self.pixel_std) * 255).round().to(torch.uint8)
        frames = frames.permute(0, 1, 3, 4, 2).cpu().numpy()  # (B, T, H, W, C)
        out = torch.zeros(B, T)
        for b in range(B):
            for t in range(T):
                out[b, t] = self.score_frame(frames[b, t], q[b])
        return out


# -- trainable selector head ------------------------------------------------------------------------
def pooled_frame_features(pixels: Tensor, grid: int = 3, pixel_mean=None, pixel_std=None) -> Tensor:
    """Weight-free frame features: each frame average-pooled to grid x grid cells (the paper pools
    its SigLIP tokens to 3x3), flattened: (B, T, C * grid * grid), centred per feature."""
    x = to_unit(pixels, pixel_mean, pixel_std)
    B, T = x.shape[:2]
    f = F.adaptive_avg_pool2d(x.flatten(0, 1), grid).reshape(B, T, -1)
    return f * 2.0 - 1.0


_WORD = re.compile(r"[a-z0-9]+")


def hashed_text_features(questions: list, dim: int = 64) -> Tensor:
    """Weight-free question features: a signed feature-hashing bag of words (crc32, stable across
    runs and machines), L2-normalised: (B, dim)."""
    out = torch.zeros(len(questions), dim)
    for b, q in enumerate(questions):
        for w in _WORD.findall(q.lower()):
            h = zlib.crc32(w.encode())
            out[b, h % dim] += 1.0 if (h >> 16) & 1 else -1.0
    return F.normalize(out, dim=-1)


class FrameSelectorHead(nn.Module):
    """A small selector in the paper's shape: [frame tokens, question token, score query] through a
    tiny transformer; each frame's score comes from an MLP over (its output, the score query's
    output, their product). Deviation: the paper maps the score query alone to a fixed n = 128
    vector; scoring per frame from the query state works for any number of frames."""

    def __init__(self, frame_dim: int = 27, text_dim: int = 64, width: int = 64, depth: int = 2, heads: int = 4,
                 max_frames: int = 256):
        super().__init__()
        self.config = dict(frame_dim=frame_dim, text_dim=text_dim, width=width, depth=depth, heads=heads,
                           max_frames=max_frames)
        self.frame_in = nn.Linear(frame_dim, width)
        self.text_in = nn.Linear(text_dim, width)
        self.time = nn.Parameter(torch.zeros(max_frames, width))
        self.query = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.time, std=0.02)
        nn.init.normal_(self.query, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(3 * width), nn.Linear(3 * width, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, frame_feats: Tensor, text_feats: Tensor) -> Tensor:
        """frame_feats (B, T, frame_dim), text_feats (B, text_dim) -> (B, T) logits."""
        B, T, _ = frame_feats.shape
        if T > self.time.shape[0]:
            raise ValueError(f"FrameSelectorHead was built for at most {self.time.shape[0]} frames, got {T}")
        # time embedding sampled at relative positions, so any T maps onto the same range
        pos = torch.linspace(0, self.time.shape[0] - 1, T, device=frame_feats.device).round().long()
        f = self.frame_in(frame_feats) + self.time[pos]
        t = self.text_in(text_feats)[:, None]
        h = self.encoder(torch.cat([f, t, self.query.expand(B, -1, -1)], dim=1))
        hf, hq = h[:, :T], h[:, -1:].expand(-1, T, -1)
        return self.head(torch.cat([hf, hq, hf * hq], dim=-1))[..., 0]

    # -- persistence (safetensors + the config in its metadata) --------------------------------
    def save(self, path) -> None:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"tokenreduce": "frame_selector_head", "config": json.dumps(self.config)})

    @classmethod
    def load(cls, path, map_location="cpu") -> "FrameSelectorHead":
        from safetensors import safe_open
        from safetensors.torch import load_file
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"frame selector weights {str(path)!r} not found; train them with "
                                    "python -m tokenreduce.eval.train_frame_selector --out PATH")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("tokenreduce") != "frame_selector_head":
            raise ValueError(f"{str(path)!r} is not a tokenreduce frame selector head")
        head = cls(**json.loads(meta["config"]))
        head.load_state_dict(load_file(str(path), device=str(map_location)))
        return head.eval()


@register_scorer("head")
class HeadScorer:
    """Scores frames with a trained FrameSelectorHead (sigmoid of its logits).

    path: a safetensors file written by FrameSelectorHead.save / train_frame_selector; or head:
    a FrameSelectorHead instance. Features are the weight-free ones the head was trained on
    (3x3 pooled pixels, hashed bag of words) unless frame_encoder / text_encoder callables
    are given (pixels (B, T, C, H, W) -> (B, T, D); list[str] -> (B, D'))."""

    def __init__(self, path=None, head: FrameSelectorHead | None = None, frame_encoder=None, text_encoder=None,
                 pixel_mean=None, pixel_std=None):
        if (path is None) == (head is None):
            raise ValueError("head scorer: give exactly one of path= (a safetensors file) or head= (a FrameSelectorHead)")
        self.head = (head if head is not None else FrameSelectorHead.load(path)).eval()
        cfg = self.head.config
        grid = int(round(math.sqrt(cfg["frame_dim"] / 3)))
        self.frame_encoder = frame_encoder or (lambda p: pooled_frame_features(p, grid, pixel_mean, pixel_std))
        self.text_encoder = text_encoder or (lambda q: hashed_text_features(q, cfg["text_dim"]))

    @torch.no_grad()
    def __call__(self, pixels: Tensor, questions=None, k: int | None = None) -> Tensor:
        q = _need_questions("head", questions, pixels.shape[0])
        dev = next(self.head.parameters()).device
        logits = self.head(self.frame_encoder(pixels).to(dev), self.text_encoder(q).to(dev))
        return torch.sigmoid(logits).cpu()
