"""torchvision Video Swin Transformer: swin3d_t / swin3d_s / swin3d_b (SwinTransformer3d).

Sites
  frames     before the patch embedding, on the (B, C, T, H, W) input's frame axis
  stage.{s}  before the blocks of stage s (s = 0..3): stage.0 right after the patch embedding,
             stage.s (s >= 1) right after the PatchMerging that ends stage s-1, i.e. a
             pre-hook on `features[2 s]`. The tokens there are a dense (B, T', H', W', C) grid
             (16 x 224 x 224 input: T' = 8 temporal slices; 56x56, 28x28, 14x14, 7x7 spatially;
             PatchMerging halves H and W only, so T' is the same at every stage).

Only structured plans are accepted inside the network: shifted-window attention partitions a
dense grid into 3-D windows, so the kept tokens must again form a dense grid. The stage sites
publish SiteInfo(structured=True): an unstructured reducer (tome, random, uniform, ...) is
refused by reduce(). At run time the kept tokens must form a Cartesian product of temporal
slices x rows x columns (whole temporal slices; or a rectangular block, which should be
window-aligned to keep the windows the model was trained with — the model pads any size);
anything else raises a SiteError naming the offending site. The grid is flattened to
(B, T'H'W', C) for the stream (frame = original temporal slice index), and reshaped back in
raster order after the plan.

Merged slices (a structured merging plan) carry their sizes to the final average pool, which
is then size-weighted over time. No CLS token; nothing is protected.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from tokenreduce.errors import SiteError
from tokenreduce.flops import linear_macs
from tokenreduce.hooks import run_stages
from tokenreduce.registry import register_adapter
from tokenreduce.stream import TokenStream

from .base import Adapter, PerThreadState, is_a, site
from .frames import FRAMES, frames_site_info, reduce_frames

_SWIN3D = "torchvision.models.video.swin_transformer.SwinTransformer3d"

STRUCTURED_NOTE = ("VideoSwin's shifted-window attention needs a dense (T, H, W) token grid, so only whole "
                   "temporal slices or rectangular window-aligned blocks can be removed")


class _Pass:
    def __init__(self):
        self.slices = None       # (B, T') original temporal slice index of each current slice
        self.slice_size = None   # (B, T') how many original slices each current slice stands for
        self.full = {}           # stage -> (T, H, W) an unreduced model would process
        self.input_frames = None  # frames the model was given (before the frames site)


@register_adapter
class VideoSwinAdapter(PerThreadState, Adapter):
    """A forward's state (`_pass`) is per thread, so two threads may run one reduced model at once."""

    name = "videoswin"
    family = "torchvision SwinTransformer3d (swin3d_t / swin3d_s / swin3d_b)"
    priority = 10
    PER_FORWARD = {"_pass": _Pass}

    @classmethod
    def matches(cls, model) -> bool:
        return is_a(model, _SWIN3D)

    def __init__(self, model):
        super().__init__(model)
        feats = list(model.features)
        self.stage_modules = [m for m in feats if isinstance(m, nn.Sequential)]
        self.merges = [m for m in feats if not isinstance(m, nn.Sequential)]
        if not self.stage_modules or len(self.merges) != len(self.stage_modules) - 1:
            raise SiteError(f"videoswin: unexpected features layout {[type(m).__name__ for m in feats]}; expected "
                            "stages (Sequential of blocks) interleaved with PatchMerging")

    # -- sites ---------------------------------------------------------------------------------
    def sites(self) -> dict:
        S = len(self.stage_modules)
        out = {FRAMES: frames_site_info()}
        for s in range(S):
            n = f"stage.{s}"
            out[n] = site(n, "stage", s, S, {"x"}, structured=True, note=STRUCTURED_NOTE)
        return out

    # -- install -------------------------------------------------------------------------------
    def install(self, stages, recorder) -> None:
        self.recorder = recorder
        self._infos = self.sites()
        self._by_site = {}
        for name, red in stages:
            self._by_site.setdefault(name, []).append(red)
        H = self.hooks
        H.pre(self.model.patch_embed, self._on_input)
        for s, mod in enumerate(self.stage_modules):
            H.pre(mod, partial(self._stage_pre, s))
        H.pre(self.model.avgpool, self._weighted_pool)

    # -- hooks ---------------------------------------------------------------------------------
    def _on_input(self, module, args):
        self._pass = _Pass()
        rec = self.recorder.begin()
        x = args[0]
        self._pass.input_frames = x.shape[2]
        if FRAMES not in self._by_site:
            return None
        new, kept = reduce_frames(x, 2, self._by_site[FRAMES], self.context, self._infos, self.recorder)
        if new is None:
            return None
        rec.extra["kept_frames"] = kept
        return (new,) + tuple(args[1:])

    def _stage_pre(self, s, module, args):
        x = args[0]
        p = self._pass
        B, T, Hh, Ww, C = x.shape
        if p.slices is None:
            p.slices = torch.arange(T, device=x.device).expand(B, T)
            p.slice_size = torch.ones(B, T, device=x.device)
            self.recorder.last.extra["tokens_start"] = T * Hh * Ww
        if p.slices.shape[1] != T:
            raise RuntimeError(f"tokenreduce: stage.{s} sees {T} temporal slices but the reduction state has "
                               f"{p.slices.shape[1]}; was the model called from the middle?")
        if s == 0 or (s - 1) not in p.full:
            # an unreduced model sees every input frame (the frames site may have dropped some)
            pt = self.model.patch_embed.tuple_patch_size[0]
            p.full[s] = (max(T, -(-(p.input_frames or 0) // pt)), Hh, Ww)
        else:  # PatchMerging pads to even and halves H and W
            fT, fH, fW = p.full[s - 1]
            p.full[s] = (fT, (fH + 1) // 2, (fW + 1) // 2)
        full_n = p.full[s][0] * p.full[s][1] * p.full[s][2]
        n_in = T * Hh * Ww
        name = f"stage.{s}"
        out = None
        if name in self._by_site:
            x2 = self._run(name, s, x)
            if x2 is not None:
                out = (x2,) + tuple(args[1:])
                x = x2
        # stage -> ((T, H, W) its blocks process, what an unreduced model's would), in the pass's
        # record, so stats read from another thread (the latest of any) find it
        self.recorder.last.extra.setdefault("stage_grids", {})[s] = (tuple(x.shape[1:4]), p.full[s])
        n_out = x.shape[1] * x.shape[2] * x.shape[3]
        self.recorder.layer(s, n_in, n_out)
        # tokens an unreduced model would carry through this stage's blocks, and what they carry now
        self.recorder.last.extra.setdefault("stage_tokens", {})[s] = [full_n, n_out]
        return out

    def _run(self, name, s, x):
        p = self._pass
        B, T, Hh, Ww, C = x.shape
        flat = x.reshape(B, T * Hh * Ww, C)
        frame = p.slices.repeat_interleave(Hh * Ww, dim=1)
        info = self._infos[name]
        stream = TokenStream.start(flat, grid=(T, Hh, Ww), frame=frame, order="prefix")
        stream.size = p.slice_size.repeat_interleave(Hh * Ww, dim=1).clone()
        stream = stream.with_x(flat, site=name, layer=s, depth=info.depth, info=info, own_layer=None)
        stream, plans = run_stages(stream, self._by_site[name], self.recorder)
        if not plans:
            return None
        return self._regrid(name, stream, (T, Hh, Ww))

    def _regrid(self, name, stream, grid):
        """Reshape the kept tokens back into a dense (B, T'', H'', W'', C) grid, or refuse."""
        T, Hh, Ww = grid
        B, K = stream.pos.shape
        if stream.valid is not None and not bool(stream.valid.all()):
            raise SiteError(f"videoswin {name}: the plan keeps different numbers of tokens per sample; "
                            f"{STRUCTURED_NOTE}")
        pos, order = stream.pos.sort(dim=1)
        t, h, w = pos // (Hh * Ww), (pos // Ww) % Hh, pos % Ww
        dims = None
        ts_all = []
        for b in range(B):
            ts, hs, ws = t[b].unique(), h[b].unique(), w[b].unique()
            d = (len(ts), len(hs), len(ws))
            expect = (ts[:, None, None] * (Hh * Ww) + hs[None, :, None] * Ww + ws[None, None, :]).reshape(-1)
            if d[0] * d[1] * d[2] != K or not torch.equal(expect, pos[b]) or (dims is not None and d != dims):
                raise SiteError(
                    f"videoswin {name}: the plan keeps {K} of {T * Hh * Ww} tokens that do not form whole temporal "
                    f"slices or a rectangular block of the ({T}, {Hh}, {Ww}) grid (sample {b} spans {d[0]} slices, "
                    f"{d[1]} rows, {d[2]} columns). {STRUCTURED_NOTE}")
            dims = d
            ts_all.append(ts)
        x = stream.x.gather(1, order[..., None].expand(B, K, stream.x.shape[-1]))
        x = x.reshape(B, *dims, x.shape[-1])
        p = self._pass
        ts = torch.stack(ts_all)
        p.slices = p.slices.gather(1, ts)
        # size of each kept slice: its tokens' mean size (1 unless slices were merged)
        size = stream.size.gather(1, order).reshape(B, dims[0], -1).mean(-1)
        p.slice_size = size
        return x

    def _weighted_pool(self, module, args):
        p = self._pass
        if p.slice_size is None or bool((p.slice_size == 1).all()):
            return None
        x = args[0]  # (B, C, T, H, W)
        w = p.slice_size.to(x.dtype)
        if w.shape[1] != x.shape[2]:
            return None
        pooled = (x.mean(dim=(3, 4)) * w[:, None]).sum(-1) / w.sum(-1)[:, None]
        return (pooled[:, :, None, None, None],)

    # -- stats ---------------------------------------------------------------------------------
    def flops(self, record):
        """Analytic FLOPs of the stages (linear layers, window attention, patch merging)."""
        grids = record.extra.get("stage_grids")
        if not grids:
            return None
        reduced = full = 0.0
        for s, mod in enumerate(self.stage_modules):
            if s not in grids:
                continue
            for grid, acc in zip(grids[s], "rf"):
                n = grid[0] * grid[1] * grid[2]
                f = 0.0
                for blk in mod:
                    ws = blk.attn.window_size
                    win = 1
                    for g, wsz in zip(grid, ws):
                        win *= min(g, wsz)
                    dim = blk.attn.qkv.in_features
                    f += 2.0 * n * linear_macs(blk) + 4.0 * n * win * dim
                if s < len(self.merges):
                    f += 2.0 * (n / 4) * linear_macs(self.merges[s])
                if acc == "r":
                    reduced += f
                else:
                    full += f
        return reduced, full
