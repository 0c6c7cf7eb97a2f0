"""The `frames` site shared by the video adapters: selecting (or merging) whole frames of the
pixel video before the vision encoder runs.

The stream at `frames` has ONE TOKEN PER FRAME: x = (B, T, C) the spatially mean-pooled pixels
of each frame (a cheap descriptor), pos = frame = arange(T), grid = (T, 1, 1), kind VISUAL,
order "sequence" (survivors always come back in time order). Signals:
  ("pixels", None)    the (B, T, C, H, W) frames exactly as the model receives them
                      (already normalised by the processor, if it normalises);
  ("question", None)  handle.context.get("question"): a list of B strings, or None.
A plan's `keep` (B, k) selects frames; the same plans are replayed on the pixel video (a gather,
or for merging plans the same weighted mean), so every sample must keep the same count k.

This module only moves tensors; which frames to keep is the reducers' business.
"""
from __future__ import annotations

from torch import Tensor

from tokenreduce.errors import SiteError
from tokenreduce.hooks import Recorder, run_stages
from tokenreduce.stream import TokenStream, apply_plan

from .base import site

FRAMES = "frames"


def frames_site_info():
    return site(FRAMES, FRAMES, None, None, {"pixels", "question", "x"},
                note="the frames site sees the pixel video, one token per frame")


def questions_for(context: dict, batch: int):
    """handle.context["question"] as a list of `batch` strings (a single string is repeated)."""
    q = context.get("question") if context else None
    if q is None:
        return None
    if isinstance(q, str):
        return [q] * batch
    q = list(q)
    if len(q) == 1 and batch > 1:
        q = q * batch
    if len(q) != batch or not all(isinstance(s, str) for s in q):
        raise ValueError(f"handle.context['question'] must be a string or a list of {batch} strings "
                         f"(one per sample), got {context.get('question')!r}")
    return q


def reduce_frames(video: Tensor, time_dim: int, reducers, context: dict, infos: dict,
                  recorder: Recorder | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Run the `frames` stages on `video` whose frame axis is `time_dim`.

    `video` is (B, T, C, H, W) with time_dim=1 (HF VideoMAE) or (B, C, T, H, W) with time_dim=2
    (torchvision video models). Returns (the reduced video in the same layout, or None when
    nothing changed; the kept original frame indices (B, k), or None).
    """
    if video.dim() != 5:
        raise SiteError(f"{FRAMES}: expected a 5-D video tensor, got shape {tuple(video.shape)}")
    v = video.movedim(time_dim, 1)  # (B, T, C, H, W)
    B, T = v.shape[:2]
    desc = v.float().mean(dim=(-2, -1))
    stream = TokenStream.start(desc, grid=(T, 1, 1), order="sequence")
    info = infos[FRAMES]
    stream = stream.with_x(desc, site=FRAMES, layer=None, depth=None, info=info, own_layer=None, order="sequence")
    stream.signals.put("pixels", None, stream.pos, v)
    stream.signals.put("question", None, stream.pos, questions_for(context, B))
    stream, plans = run_stages(stream, reducers, recorder)
    if not plans:
        return None, None
    if stream.valid is not None and not bool(stream.valid.all()):
        raise SiteError(f"{FRAMES}: the plan keeps different numbers of frames per sample; the video model "
                        "needs the same frame count for every sample of a batch")
    # replay the applied plans on the pixels (same gather / weighted mean as the descriptors)
    shape = v.shape[2:]
    pix = TokenStream.start(v.reshape(B, T, -1), grid=(T, 1, 1), order="sequence")
    for p in plans:
        pix, _ = apply_plan(pix, p)
    out = pix.x.reshape(B, pix.x.shape[1], *shape).movedim(1, time_dim)
    return out, stream.pos
