"""Frame selection as a plain function, before any processor or model:

    frames, meta = read_frames("clip.mp4", num_frames=128)
    picked, idx = select_frames(frames, "what does the man pick up?", k=8, scorer="clip",
                                model="ViT-B-32", pretrained="/path/open_clip_model.bin")
    inputs = processor(videos=[picked], text=prompt, return_tensors="pt")

The same selection (scorers + greedy temporal suppression) runs inside a model at its `frames`
site as `frames=frame_select(k=8, scorer="clip")`.
"""
from __future__ import annotations

import numpy as np
import torch

from tokenreduce.reducers.frame_select import call_scorer, suppress_select
from tokenreduce.registry import scorer_factory


def _as_pixels(frames) -> tuple[torch.Tensor, str]:
    """(T, H, W, 3) uint8 numpy or (T, C, H, W) tensor -> (1, T, 3, H, W) float in [0, 1] (grey
    frames repeated over the three channels)."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
            raise ValueError(f"numpy frames must be (T, H, W, 3) (or 1 channel, or RGBA), got shape {frames.shape}")
        t = torch.from_numpy(np.ascontiguousarray(frames[..., :3])).permute(0, 3, 1, 2)
        kind = "numpy"
    elif torch.is_tensor(frames):
        if frames.dim() != 4 or frames.shape[1] not in (1, 3, 4):
            hint = "; it looks channels-last: pass frames.permute(0, 3, 1, 2)" \
                if frames.dim() == 4 and frames.shape[-1] in (1, 3, 4) else ""
            raise ValueError(f"tensor frames must be (T, C, H, W) with C = 3 (or 1, or RGBA), got shape "
                             f"{tuple(frames.shape)}{hint}")
        t = frames[:, :3]  # RGBA: the colour channels, as for numpy frames
        kind = "tensor"
    elif isinstance(frames, (list, tuple)) and frames and hasattr(frames[0], "size") and hasattr(frames[0], "mode"):
        t = torch.from_numpy(np.stack([np.asarray(f.convert("RGB")) for f in frames])).permute(0, 3, 1, 2)
        kind = "pil"
    else:
        raise TypeError("frames must be a (T, H, W, 3) uint8 numpy array, a (T, C, H, W) tensor or a list of "
                        f"PIL images, got {type(frames).__name__}")
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if t.shape[1] == 1:  # grey frames: the scorers read RGB
        t = t.expand(-1, 3, -1, -1)
    return t[None], kind


def select_frames(frames, question: str | None, k: int, scorer="uniform", **scorer_args):
    """Pick k frames for `question`. Returns (the selected frames, in the input's type and time
    order; their indices as a sorted int64 numpy array).

    frames: (T, H, W, 3) uint8 numpy (what read_frames gives), a (T, C, H, W) tensor (uint8,
    or float in [0, 1]) or a list of PIL images. scorer: a registered scorer name ("uniform",
    "clip", "vlm", "head"), built with **scorer_args, or a scorer instance / callable.
    """
    pix, kind = _as_pixels(frames)
    T = pix.shape[1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= T:
        raise ValueError(f"k must be an int in [1, {T}] (the number of frames given), got {k!r}")
    if isinstance(scorer, str):
        scorer = scorer_factory(scorer)(**scorer_args)
    elif scorer_args:
        raise ValueError("scorer_args are only used with a scorer name; got a scorer instance as well")
    questions = None if question is None else [question]
    scores = call_scorer(scorer, pix, questions, int(k))
    idx = suppress_select(scores[0], int(k)).cpu().numpy().astype(np.int64)
    if kind == "pil":
        return [frames[i] for i in idx], idx
    return frames[idx] if kind == "numpy" else frames[torch.as_tensor(idx)], idx
