"""M-LLM based frame selection: score candidate frames, keep k by greedy temporal suppression."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..errors import PolicyError, UnknownMethodError
from ..registry import register_reducer, scorer_factory, scorer_names
from ..stream import Plan, TokenStream
from .base import Needs, Reducer, SiteInfo


def suppress_select(scores, k: int) -> Tensor:
    """The paper's greedy selection with temporal suppression (instead of top-k).

        delta = int(n / (4 k)); repeat k times: i = argmax s; select i; suppress every j
        with |j - i| <= delta; return the selected indices sorted (temporal order)

    scores: (n,) or (B, n) (tensor or array). Returns (k,) or (B, k) long indices, ascending.
    Ties go to the earliest frame. The paper sets suppressed scores to -1 (its scores lie in
    [0, 1]); here they are excluded outright, so scores of any range work. If every frame is
    suppressed before k are chosen (only when k is close to n), the remaining picks are the
    best-scoring frames not yet selected.
    """
    s = torch.as_tensor(np.asarray(scores) if not torch.is_tensor(scores) else scores).float()
    single = s.dim() == 1
    if single:
        s = s[None]
    if s.dim() != 2:
        raise ValueError(f"scores must be (n,) or (B, n), got shape {tuple(s.shape)}")
    B, n = s.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if k > n:
        raise ValueError(f"cannot select k={k} frames out of n={n}")
    if bool(torch.isnan(s).any()):
        raise ValueError("frame scores contain NaN")
    delta = int(n / (4 * k))
    out = torch.empty(B, k, dtype=torch.long)
    pos = torch.arange(n)
    for b in range(B):
        sb = s[b].cpu()
        avail = torch.ones(n, dtype=torch.bool)
        chosen = torch.zeros(n, dtype=torch.bool)
        for j in range(k):
            pool = avail & ~chosen
            if not bool(pool.any()):
                pool = ~chosen
            i = int(torch.argmax(sb.masked_fill(~pool, float("-inf"))))
            out[b, j] = i
            chosen[i] = True
            avail &= (pos - i).abs() > delta
    out = out.sort(dim=1).values.to(s.device)
    return out[0] if single else out


def call_scorer(scorer, pixels: Tensor, questions, k: int) -> Tensor:
    """Call a frame scorer; `k` is passed to scorers that accept it (e.g. the uniform one)."""
    try:
        params = inspect.signature(scorer).parameters
        takes_k = "k" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        takes_k = False
    scores = scorer(pixels, questions, k=k) if takes_k else scorer(pixels, questions)
    scores = torch.as_tensor(scores)
    B, T = pixels.shape[:2]
    if scores.shape != (B, T):
        raise ValueError(f"frame scorer {type(scorer).__name__} returned scores of shape {tuple(scores.shape)}, "
                         f"expected (B={B}, T={T})")
    return scores


@register_reducer
@dataclass
class FrameSelect(Reducer):
    """M-LLM Based Video Frame Selection for Efficient Video Understanding. Hu et al., CVPR 2025,
    arXiv:2502.19680 (no official code). At the `frames` site (before the vision encoder) a
    scorer rates each candidate frame for the question; k frames are kept by greedy temporal
    suppression (delta = int(n / (4k)), see `suppress_select`) and returned in time order.

    k: frames kept. scorer: a registered scorer name (`tokenreduce.registry.scorer_names()`:
    "uniform", "clip", "vlm", "head") or any callable scorer(pixels (B, T, C, H, W),
    questions list[str] | None, k=...) -> (B, T) scores. scorer_args: keyword arguments for
    the named scorer's constructor (e.g. {"model": "ViT-B-32", "pretrained": "/path/to.bin"}).
    query: a fixed question; otherwise handle.context["question"] is used.
    The named scorer is built on first use and cached on this reducer instance.

    With scorer="uniform" the selection equals uniform sampling, round(linspace(0, n-1, k)).
    """

    name = "frame_select"
    summary = "keep k frames chosen by a frame scorer with greedy temporal suppression"
    paper = "Hu et al., M-LLM Based Video Frame Selection for Efficient Video Understanding, CVPR 2025 (arXiv:2502.19680)"
    site_families = ("frames",)
    structured = True

    k: int = 8
    scorer: object = "uniform"
    query: object = None
    scorer_args: object = None
    _scorer_cache: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise PolicyError(f"frame_select: k must be an int >= 1 (frames kept), got {self.k!r}")
        if isinstance(self.scorer, str):
            try:
                scorer_factory(self.scorer)
            except UnknownMethodError as exc:
                raise PolicyError(f"frame_select: {exc}") from None
        elif not callable(self.scorer):
            raise PolicyError(f"frame_select: scorer must be a scorer name ({', '.join(scorer_names())}) "
                              f"or a callable, got {self.scorer!r}")
        if self.query is not None and not isinstance(self.query, str):
            raise PolicyError(f"frame_select: query must be a string or None, got {self.query!r}")
        if self.scorer_args is not None and not isinstance(self.scorer_args, dict):
            raise PolicyError(f"frame_select: scorer_args must be a dict of keyword arguments, got {self.scorer_args!r}")

    def needs(self, site: SiteInfo) -> Needs:
        return Needs(signals={"pixels": (None,)})

    def get_scorer(self):
        if not isinstance(self.scorer, str):
            return self.scorer
        if self._scorer_cache is None:
            self._scorer_cache = scorer_factory(self.scorer)(**(self.scorer_args or {}))
        return self._scorer_cache

    def plan(self, stream: TokenStream) -> Plan | None:
        T = stream.num_tokens
        if self.k >= T:
            return None
        pixels = stream.signal("pixels")
        B = pixels.shape[0]
        questions = [self.query] * B if self.query is not None else (
            stream.signal("question") if stream.signals.has("question") else None)
        scores = call_scorer(self.get_scorer(), pixels, questions, self.k).to(stream.pos.device)
        return Plan(keep=suppress_select(scores, self.k))
