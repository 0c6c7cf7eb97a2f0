"""DyCoke's temporal token merging (TTM): prune each frame's tokens that repeat an earlier frame."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import PolicyError, SiteError
from ..registry import register_reducer
from ..stream import Plan, TokenStream
from ._packing import pack, protected_indices
from .base import Reducer, check_choice, check_fraction

DEFAULT_K = 0.7  # the README's setting (the reference's model builder defaults to 0.3)
#: within each window of 4 frames: (frame, the frame it is compared with); frame 0 is kept whole
WINDOW = 4
PAIRS = ((1, 0), (2, 0), (3, 2))
ON_IMAGE = ("error", "keep")


@register_reducer
@dataclass
class DyCokeTTM(Reducer):
    """DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models — the
    temporal token merging (TTM) stage. Tao, Qin, Wang, Wang, Wu, Zhang. CVPR 2025,
    arXiv:2411.15024. Reference: KD-TAO/DyCoke, llava/model/llava_arch.py `dycole_ttm`
    (applied to LLaVA-OneVision video features after the projector and 2-D pooling, before the
    trailing newline token).

    At `projector.out`, per video item: frames are taken in windows of 4. Frame 0 of a window
    is kept whole; frame 1 is pruned against frame 0, frame 2 against frame 0 and frame 3
    against frame 2 (against the unpruned frame 2). Pruning a frame keeps the
    int((1 - K) * P) tokens whose cosine similarity to the token at the SAME grid position of
    the compared frame is LOWEST (P = tokens per frame, from the stream's grid) and drops the
    rest; despite the name nothing is averaged. Protected tokens (the newline) are kept.

    K: `k` (default 0.7, the README's setting; the reference's model builder defaults to 0.3)
    or `ratio` (the shared name for "fraction removed"), the same number. The KV-cache pruning
    stage of DyCoke (during decoding) is not part of this reducer.

    Deviations from the reference code (KD-TAO/DyCoke dd74634, llava_arch.py `dycole_ttm`; its
    first commit 26dc6f4 also scored frame 2i+1 against the previous pair, fixed since):
    - its second loop runs over range(0, T - 4, 4): when T is a multiple of 4 (T >= 8) the last
      window's frame 2 is never pruned, and for T <= 4 it raises (an empty torch.stack); we prune
      frame 2 in every window, the last included;
    - with an odd frame count it silently loses the last frame; we treat a trailing partial
      window by the same rules (its frame 0 whole, 1 and 2 against 0).
    - Survivors keep sequence (spatial) order, which the LLM reads at `projector.out`; the
      reference orders a pruned frame's survivors by ascending similarity (a topk artefact).
    A token whose partner position is missing (removed by an earlier stage) counts as least
    similar (it is kept first).

    On a stream without a frame layout (an image; a model whose adapter sets no frame / patch /
    grid) or with a single frame, `on_image="error"` (default) raises SiteError; "keep" passes
    such items through unchanged.
    """

    name = "dycoke_ttm"
    summary = "per 4-frame window, drop the tokens most similar to the same position in an earlier frame"
    paper = "Tao et al., DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models, CVPR 2025 (arXiv:2411.15024)"
    site_families = ("projector.out",)

    k: object = None        # None: DEFAULT_K
    ratio: object = None
    on_image: str = "error"

    def __post_init__(self):
        for name in ("k", "ratio"):
            if getattr(self, name) is not None:
                check_fraction(self.name, name, getattr(self, name), 0.0, 1.0)
        if self.k is not None and self.ratio is not None and self.k != self.ratio:
            raise PolicyError(f"dycoke_ttm: k and ratio name the same number (fraction of a pruned frame's "
                              f"tokens removed); got k={self.k!r} and ratio={self.ratio!r}, give one")
        check_choice(self.name, "on_image", self.on_image, ON_IMAGE)

    @property
    def K(self) -> float:
        return float(next((v for v in (self.ratio, self.k) if v is not None), DEFAULT_K))

    def kept_per_frame(self, P: int) -> int:
        """The reference's count: int((1 - K) * P)."""
        return int((1 - self.K) * P)

    # -- plan -----------------------------------------------------------------------------------
    def _layout(self, stream: TokenStream):
        vis = stream.visual
        if stream.grid is None or stream.patch is None or not bool((stream.frame[vis] >= 0).all()) \
                or not bool(vis.any()):
            why = "no frame layout (frame / patch / grid)"
        elif len(stream.frame[vis].unique()) < 2:
            why = "a single frame"
        else:
            return stream.grid
        if self.on_image == "keep":
            return None
        raise SiteError(f"dycoke_ttm at {stream.site or 'this site'!r} prunes video frames, but this item has {why}: "
                        "an image, or a model whose adapter does not publish its video frame layout. Run it on "
                        "video items (LLaVA-OneVision / LLaVA-NeXT-Video videos at projector.out), or pass "
                        f"on_image='keep' to let such items through; valid on_image values: {', '.join(ON_IMAGE)}")

    def plan(self, stream: TokenStream) -> Plan | None:
        grid = self._layout(stream)
        if grid is None:
            return None
        _, H, W = grid
        P = H * W
        n_keep = self.kept_per_frame(P)
        keeps, changed = [], False
        for b in range(stream.batch):
            chosen, dropped = self._sample(stream, b, P, n_keep)
            changed |= dropped
            keeps.append(torch.cat([protected_indices(stream, b), chosen]).sort().values)
        if not changed:
            return None
        return pack(stream, keeps)

    def _sample(self, stream: TokenStream, b: int, P: int, n_keep: int):
        """Kept visual indices of sample b and whether anything was dropped."""
        dev = stream.pos.device
        vis = torch.nonzero(stream.visual[b]).squeeze(1)
        frames = stream.frame[b, vis]
        patch = stream.patch[b, vis]
        ids = frames.unique(sorted=True)
        T = len(ids)
        # dense (T, P) table of token indices, -1 where a position is missing
        table = torch.full((T, P), -1, dtype=torch.long, device=dev)
        table[torch.searchsorted(ids, frames), patch.clamp(0, P - 1)] = vis
        x = stream.x[b].float()
        keep = torch.zeros(stream.num_tokens, dtype=torch.bool, device=dev)
        keep[vis] = True
        dropped = False
        for w in range(0, T, WINDOW):
            for f, ref in PAIRS:
                f, ref = w + f, w + ref
                if f >= T:
                    break
                here, there = table[f], table[ref]
                present = here >= 0
                if int(present.sum()) <= n_keep:
                    continue
                sim = torch.full((P,), float("inf"), device=dev)
                both = present & (there >= 0)
                sim[present] = float("-inf")     # no partner: least similar
                if bool(both.any()):
                    sim[both] = F.cosine_similarity(x[here[both]], x[there[both]], dim=-1)
                order = torch.argsort(sim, stable=True)        # lowest similarity first
                drop = order[n_keep:int(present.sum())]
                keep[here[drop]] = False
                dropped = True
        return torch.nonzero(keep).squeeze(1), dropped
