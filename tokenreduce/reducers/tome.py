"""ToMe: Token Merging."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import PolicyError
from ..ops import bipartite_soft_matching, parse_r
from ..registry import register_reducer
from ..stream import Plan, TokenStream
from .base import Needs, Reducer, SiteInfo


@register_reducer
@dataclass
class ToMe(Reducer):
    """Token Merging: Your ViT But Faster. Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman.
    ICLR 2023, arXiv:2210.09461. Reference: facebookresearch/ToMe (tome/merge.py).

    Inside a block, after attention + residual and before the MLP: bipartite soft matching on
    the block's keys averaged over heads merges the r most similar A->B pairs (size-weighted
    mean, sizes summed). CLS / distillation / register tokens are protected. With `prop_attn`
    the following attention layers add log(size) to their logits (proportional attention),
    passed as a float bias so SDPA stays on.

    r: tokens merged per layer: an int, or a list per block; `inflection` turns an int into a
    linear ramp (0 = constant, -1 = decreasing from 2r, as `parse_r((r, -1))`). r is clamped
    to (N - protected) // 2. trace_source: track which original patches each token holds.
    Survivor order is the reference's [unmerged A, B] (protected tokens first).

    Deviation: besides `vision.block.k` (the paper's place), the stage may sit at
    `vision.layer.k`, between blocks (after block k-1's MLP), matching on block k-1's keys; the
    paper only merges inside a block.
    """

    name = "tome"
    summary = "bipartite soft matching merges the r most similar token pairs per ViT block"
    paper = "Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023 (arXiv:2210.09461)"
    site_families = ("vision.block", "vision.layer")

    r: object = 8
    inflection: float = 0.0
    prop_attn: bool = True
    trace_source: bool = False

    def __post_init__(self):
        if isinstance(self.r, tuple):  # ToMe's (r, inflection) form
            if len(self.r) != 2:
                raise PolicyError(f"tome: r as a tuple must be (r, inflection), got {self.r!r}")
            if self.inflection != 0.0 and self.inflection != self.r[1]:  # 0.0: the default, not given
                raise PolicyError(f"tome: r={self.r!r} already gives the inflection; got inflection="
                                  f"{self.inflection!r} too, give one")
            r, infl = self.r
            if isinstance(r, bool) or not isinstance(r, int) or isinstance(infl, bool) or \
                    not isinstance(infl, (int, float)):
                raise PolicyError(f"tome: r as a tuple must be (int r >= 0, inflection in [-1, 1]), got {self.r!r}")
            self.r, self.inflection = r, infl
        if isinstance(self.r, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.r):
                raise PolicyError(f"tome: r as a list must hold ints >= 0 (one per block), got {self.r!r}")
        elif isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise PolicyError(f"tome: r must be an int >= 0, an (r, inflection) tuple or a list per block, got {self.r!r}")
        if isinstance(self.inflection, bool) or not isinstance(self.inflection, (int, float)) or \
                not -1.0 <= self.inflection <= 1.0:
            raise PolicyError(f"tome: inflection must lie in [-1, 1], got {self.inflection!r}")
        self.inflection = float(self.inflection)

    def needs(self, site: SiteInfo) -> Needs:
        return Needs(signals={"keys": (None,)}, prop_attn=self.prop_attn, source=self.trace_source)

    def schedule(self, depth: int) -> list:
        return parse_r(depth, self.r, self.inflection)

    def check_site(self, site: SiteInfo) -> None:
        super().check_site(site)
        if site.depth is not None:
            # worked out here, on the host: traced in the forward with torch.compile's dynamic
            # shapes, `inflection` is a symbolic float and every later size a symbolic expression
            self.__dict__.setdefault("_schedules", {})[site.depth] = self.schedule(site.depth)

    def plan(self, stream: TokenStream) -> Plan | None:
        known = self.__dict__.get("_schedules", {}).get(stream.depth)
        r = (known or self.schedule(stream.depth))[stream.layer]
        if r <= 0:
            return None
        # with the protected count known on the host (CLS, registers) the matching lists them
        # first, in the stream's prefix order, so no re-sort follows on the device
        prefix = stream.num_protected is not None
        keep, assign, _, merged = bipartite_soft_matching(stream.signal("keys"), r, None if prefix else stream.protected,
                                                          num_protected=stream.num_protected, protected_first=prefix)
        return Plan(keep=keep, assign=assign, checked=True, ordered="prefix" if prefix else None, merged=merged)
