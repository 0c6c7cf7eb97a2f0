"""Random pruning baseline."""
from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..errors import PolicyError
from ..registry import register_reducer
from ..stream import Plan, TokenStream, keep_top_visual
from .base import Reducer, check_budget


@register_reducer
@dataclass
class RandomPrune(Reducer):
    """Random token pruning: the control every score-based method must beat at the same budget.

    Keeps `keep` visual tokens drawn uniformly at random, in original order, independently for
    each sample of the batch (seeded by `seed` and the site, so the same batch gives the same
    output). With `shared=True` every sample keeps the same random pattern instead, indexed by
    each token's rank among the visual tokens of its sample: then a sample's result does not
    depend on the batch or padding around it (what batch-vs-single tests need), but the subset
    is the same for every image, a stronger control than independent draws.
    """

    name = "random"
    summary = "keep a random subset of visual tokens (baseline)"
    paper = "baseline (no paper)"
    site_families = ("vision.block", "vision.layer", "vision.out", "projector.out", "llm.layer")

    keep: object = 0.5
    seed: int = 0
    shared: bool = False

    def __post_init__(self):
        check_budget(self.name, "keep", self.keep)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise PolicyError(f"random: seed must be an int, got {self.seed!r}")
        if not isinstance(self.shared, bool):
            raise PolicyError(f"random: shared must be True or False, got {self.shared!r}")

    def plan(self, stream: TokenStream) -> Plan | None:
        k = stream.prune_budget(self.keep)
        if k is None:
            return None
        shape = (stream.num_tokens,) if self.shared else tuple(stream.pos.shape)
        scores = _draw_on(self.seed, stream.layer or 0, stream.site, shape, stream.x.device)
        if self.shared:  # one table, indexed by each token's rank among its sample's visual tokens
            scores = scores[(stream.visual.long().cumsum(1) - 1).clamp(min=0)]
        return keep_top_visual(stream, scores, k)


# torch.compile calls it while tracing and embeds the draw (a function of constants: one graph);
# where a size is a symbol (after a second batch size) the graph breaks there
@torch.compiler.assume_constant_result
def _draw(seed: int, layer: int, site: str, shape: tuple) -> torch.Tensor:
    """The site's scores, drawn on the CPU (the same picks on every device): seeded by `seed`,
    the layer and the site's name, hashed (not its length: vision.layer.K and vision.block.K
    would collide), modulo 2**63 so that any int seed (e.g. time.time_ns()) stays in the
    generator's range."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + layer * 7919 + zlib.crc32(site.encode())) % 2 ** 63)
    return torch.rand(shape, generator=g)


_ON_DEVICE: OrderedDict = OrderedDict()  # (seed, layer, site, shape, device) -> the draw there, newest last
_ON_DEVICE_MAX = 64
_ON_DEVICE_LOCK = threading.Lock()


def _draw_on(seed: int, layer: int, site: str, shape: tuple, device: torch.device) -> torch.Tensor:
    """`_draw(...)` on `device`, copied there once and kept (the 64 latest draws): later forwards
    make no host-to-device copy, which a CUDA-graph capture refuses (the bench warms up before
    it captures). The copy is only read (ranked), never written."""
    if device.type == "cpu" or torch.compiler.is_compiling():
        return _draw(seed, layer, site, shape).to(device)
    key = (seed, layer, site, shape, device)
    with _ON_DEVICE_LOCK:
        scores = _ON_DEVICE.get(key)
        if scores is not None:
            _ON_DEVICE.move_to_end(key)
            return scores
    scores = _draw(seed, layer, site, shape).to(device)
    with _ON_DEVICE_LOCK:
        _ON_DEVICE[key] = scores
        while len(_ON_DEVICE) > _ON_DEVICE_MAX:
            _ON_DEVICE.popitem(last=False)
    return scores
