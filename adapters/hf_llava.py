"""Hugging Face LLaVA family on transformers 5.2x: LLaVA-1.5 (Llava), LLaVA-NeXT (anyres tiles),
LLaVA-OneVision (images and video, SigLIP tower), LLaVA-NeXT-Video, Qwen2-VL, Qwen2.5-VL and Qwen3-VL
(M-RoPE; Qwen3-VL's DeepStack features follow the kept and merged tokens),
and the VLMs built the same way (a tower and a projector behind get_image_features, then a decoder):
InternVL, Gemma 3, Mistral 3, Aya Vision, PaliGemma.

Sites
  frames            video models: whole frames before the vision tower (LLaVA-OneVision, NeXT-Video)
  vision.block.{i}  vision.layer.{i}   inside the tower (LLaVA-1.5; delegated to the tower adapter)
  vision.out        the selected feature layer, before the projector (LLaVA-1.5)
  projector.out     each image's / video's tokens as they will enter the LLM (every model)
  llm.layer.{k}     before decoder layer k (every model)

Everything before the LLM goes through the model's own `get_image_features` /
`get_video_features` (wrapped per instance), which both `forward()` and `generate()` call (the
`mm_encoder_outputs` path; in `forward()` we call generate's own
`_prepare_multimodal_encoder_kwargs_for_generation` so both paths compute features the same way —
a private transformers method, pinned by our transformers range). A forward pre-hook on the model then shortens each placeholder run
of `input_ids` (and the attention mask, labels, position ids) to the tokens that survived, left
padding ragged samples. Positions: 1-D RoPE models re-index contiguously after pre-LLM pruning
(what VTC-CLS, VisionZip and PruMerge do); Qwen2-VL keeps each survivor's M-RoPE position
computed on the full sequence. Inside the LLM, survivors always keep their original positions.
Outputs (logits) are scattered back to the caller's sequence length, so they stay aligned with
the input ids; dropped positions read zeros.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
import weakref

import torch
from torch import Tensor

from tokenreduce.errors import SiteError
from tokenreduce.hooks import run_stages
from tokenreduce.registry import register_adapter
from tokenreduce.stream import Kind, TokenStream

from .base import Adapter, ByCache, PerThreadState, is_a, site
from .frames import FRAMES, frames_site_info, reduce_frames
from .hf_llm import (LLMSites, gather_positions, output_cache, refuse_fixed_size_cache,
                     scatter_attention_to_input, scatter_to_input)
from .hf_vision import HFVisionAdapter

_T = "transformers.models."
KINDS = {
    _T + "llava.modeling_llava.LlavaForConditionalGeneration": "llava",
    _T + "llava_next.modeling_llava_next.LlavaNextForConditionalGeneration": "llava_next",
    _T + "llava_onevision.modeling_llava_onevision.LlavaOnevisionForConditionalGeneration": "onevision",
    _T + "llava_next_video.modeling_llava_next_video.LlavaNextVideoForConditionalGeneration": "next_video",
    _T + "qwen2_vl.modeling_qwen2_vl.Qwen2VLForConditionalGeneration": "qwen2_vl",
    # same placement as Qwen2-VL (flat patches, (t, h, w) grids, M-RoPE from get_rope_index)
    _T + "qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLForConditionalGeneration": "qwen2_vl",
    # and its DeepStack features (added to the visual tokens after the first decoder layers)
    _T + "qwen3_vl.modeling_qwen3_vl.Qwen3VLForConditionalGeneration": "qwen2_vl",
    # a tower, a projector and a decoder behind get_image_features, as LLaVA-1.5 (no vision sites:
    # their features are pooled, pixel-shuffled or patch-merged after the tower, which the vision
    # sites' token bookkeeping does not follow)
    _T + "internvl.modeling_internvl.InternVLForConditionalGeneration": "generic",
    _T + "gemma3.modeling_gemma3.Gemma3ForConditionalGeneration": "generic",
    _T + "mistral3.modeling_mistral3.Mistral3ForConditionalGeneration": "generic",  # Pixtral tower: grids from image_sizes
    _T + "aya_vision.modeling_aya_vision.AyaVisionForConditionalGeneration": "generic",
    _T + "paligemma.modeling_paligemma.PaliGemmaForConditionalGeneration": "generic",
}
PIXEL_KEYS = ("pixel_values", "pixel_values_videos", "pixel_values_images")
SEQ_KEYS = {"input_ids": 0, "attention_mask": 0, "labels": -100, "token_type_ids": 0, "mm_token_type_ids": 0}


class _Item:
    """One image / video as it enters the LLM: its final token state and its placeholder count."""

    def __init__(self, state: TokenStream, n_placeholders: int, pos_offset: int = 0):
        self.state = state
        self.n = n_placeholders
        self.offset = pos_offset  # item position = state.pos - offset


class _Prompt:
    """How one prefill shortened the caller's sequence, kept for the decode steps after it."""

    def __init__(self, col_map: Tensor, L_full: int, dropped: Tensor, real: Tensor):
        self.col_map = col_map      # (B, L') original column of each new column, -1 = new padding
        self.L_full = L_full
        self.dropped = dropped      # (B,) real tokens removed per sample
        self.real = real            # (B,) real (unpadded) tokens of the caller's prompt per sample


@register_adapter
class LlavaFamilyAdapter(PerThreadState, Adapter):
    """The state of one forward is per thread, so two threads may run one reduced model at once;
    what a prefill decided goes with the KV cache it filled (`prompts`), so its decode steps may
    run on any thread."""

    name = "hf_llava"
    family = ("transformers LLaVA / LLaVA-NeXT / LLaVA-OneVision / LLaVA-NeXT-Video / Qwen2-VL / Qwen2.5-VL / "
              "Qwen3-VL / InternVL / Gemma 3 / Mistral 3 / Aya Vision / PaliGemma")
    priority = 10
    PER_FORWARD = {
        "_items": dict,          # id(features output) -> (modality, [_Item]) computed for this forward
        "_vout": list,           # LLaVA-1.5: (tower state at vision.out, prefix count) per projector call
        "_video_frames": None, "_frames_total": None, "_frames_kept": None,
        "_features_begun": bool,  # generate() computed features (and opened the record) before its prefill
        "prompt": None,          # _Prompt: how the prefill shortened the caller's sequence
        "_prefill_pass": bool,   # this thread's forward is a prefill
        "_encoder_flags": dict,   # the forward's output flags, which the unreduced path gives the features call
        "_in_features": bool,    # inside a wrapped features call (one may call the other)
    }

    @classmethod
    def matches(cls, model) -> bool:
        return is_a(model, *KINDS)

    def __init__(self, model):
        super().__init__(model)
        self.kind = next(k for q, k in KINDS.items() if is_a(model, q))
        self.base = model.model
        self.cfg = model.config
        self.lm = self.base.language_model
        self.tower = getattr(self.base, "vision_tower", None) or getattr(self.base, "visual", None)
        # a Pixtral tower keeps each image's aspect ratio (pixtral-12b is a Llava class with one):
        # a square token count does not mean a square grid there
        self.square_grids = not is_a(self.tower, "transformers.models.pixtral.modeling_pixtral.PixtralVisionModel")
        self.image_token = getattr(self.cfg, "image_token_id", getattr(self.cfg, "image_token_index", None))
        self.video_token = getattr(self.cfg, "video_token_id", getattr(self.cfg, "video_token_index", None))
        self.tower_adapter = None
        if self.kind == "llava" and HFVisionAdapter.matches(self.tower):
            self.tower_adapter = HFVisionAdapter(self.tower)
            self.tower_adapter.owns_record = False
        self.llm = LLMSites(self.lm, self.hooks, None)
        self.position_policy = "original" if self.kind == "qwen2_vl" else "contiguous"
        # each prefill's _Prompt, by the KV cache it filled: decode steps find it from any thread
        self.prompts = ByCache()
        # every reduced features object still alive -> its record, shared by the threads:
        # generate(use_cache=False) feeds the same (already reduced) features to every step's
        # prefill, and features computed on one thread may be passed to a forward on another
        self._reduced: dict = {}
        self._reduced_lock = threading.Lock()

    # -- sites --------------------------------------------------------------------------------
    def feature_block(self) -> int:
        """Index of the tower block whose output LLaVA feeds the projector."""
        vfl = self.cfg.vision_feature_layer
        if isinstance(vfl, (list, tuple)):
            return -100
        depth = len(self.tower_adapter.blocks())
        return depth + vfl if vfl < 0 else vfl - 1

    def sites(self) -> dict:
        out = {}
        if self.kind in ("onevision", "next_video"):
            out[FRAMES] = frames_site_info()
        if self.tower_adapter is not None:
            tower = self.tower_adapter.sites()
            out.update({k: v for k, v in tower.items() if k != "vision.out"})
            tv = tower["vision.out"]
            fb = self.feature_block()
            # the tower runs all its layers before the projector: every layer's signals exist here
            own = fb if fb >= 0 else None
            out["vision.out"] = site("vision.out", "vision.out", None, tv.depth, tv.signals, note=tv.note,
                                     own_layer=own, max_layer=tv.depth - 1)
            out["projector.out"] = site("projector.out", "projector.out", None, tv.depth, tv.signals, note=tv.note,
                                        own_layer=own, max_layer=tv.depth - 1)
        else:
            out["projector.out"] = site("projector.out", "projector.out", None, None, {"x"})
        out.update(self.llm.site_infos())
        return out

    # -- install ------------------------------------------------------------------------------
    def install(self, stages, recorder) -> None:
        self.recorder = recorder
        self.llm.recorder = recorder
        infos = self.sites()
        self.infos = infos
        by = {}
        for name, red in stages:
            by.setdefault(name, []).append(red)
        self.by_site = by
        tower_stages = [(n, r) for n, r in stages if n.startswith(("vision.block.", "vision.layer."))]
        if tower_stages and isinstance(self.cfg.vision_feature_layer, (list, tuple)):
            raise SiteError("reductions inside the vision tower need a single vision_feature_layer; this model "
                            f"concatenates layers {self.cfg.vision_feature_layer}")
        extra = [(infos[n], r.needs(infos[n])) for n, r in stages if n in ("vision.out", "projector.out")]
        self._tower_active = self.tower_adapter is not None and bool(
            tower_stages or "vision.out" in by or any(nd.signals for _, nd in extra))
        # the tower's FLOPs count only when the policy changes them (sites inside it): otherwise
        # flops_fraction is the LLM's, whichever site (vision.out, projector.out, llm.layer) acts
        self._tower_reduced = self._tower_active and bool(tower_stages)
        if self._tower_active:
            self.tower_adapter.hooks = self.hooks
            self.tower_adapter.install(tower_stages, recorder, extra_needs=extra, extra_differentiable=any(
                r.differentiable for n, r in stages if n in ("vision.out", "projector.out")))
        elif "vision.out" in by:
            raise SiteError(f"vision.out needs a transformers CLIP/SigLIP tower; this model has {type(self.tower).__name__}")
        H = self.hooks
        if self._tower_active:
            H.pre(self.base.multi_modal_projector, self._vision_out)
        for modality in ("image", "video"):
            fn = getattr(self.base, f"get_{modality}_features", None)
            if fn is not None:
                H.setattr(self.base, f"get_{modality}_features", self._wrap_features(fn, modality))
        self.llm.install([(n, r) for n, r in stages if n.startswith("llm.layer.")])
        if self.llm.by_site and callable(getattr(self.lm, "_deepstack_process", None)):
            # Qwen3-VL adds DeepStack features to the visual tokens after its first layers: a
            # reduction before one of them must hand it the mask and features of the tokens kept
            H.setattr(self.lm, "_deepstack_process", self._wrap_deepstack(self.lm._deepstack_process))
        if callable(getattr(self.model, "generate", None)):
            H.setattr(self.model, "generate", self._wrap_generate(self.model.generate))
        H.pre(self.model, self._model_pre, with_kwargs=True)
        H.post(self.model, self._model_post)

    def _wrap_deepstack(self, add):
        @functools.wraps(add)
        def deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
            s = self.llm.session
            # not the width: a plan padded to a row that kept everything keeps the width L
            if s is None or not s.changed or s.owner is None:
                return add(hidden_states, visual_pos_masks, visual_embeds)
            # each current token gets the mean of the features of the input tokens it holds (its
            # own when kept, its members' when merged: as if the merge came after the add)
            B, L = visual_pos_masks.shape
            dev, D = hidden_states.device, visual_embeds.shape[-1]
            mask = visual_pos_masks.to(dev)
            full = torch.zeros(B, L, D, device=dev, dtype=visual_embeds.dtype)
            full[mask] = visual_embeds.to(dev)  # one row per True of the mask, row-major
            owner = torch.where(mask, s.owner.to(dev), -1)
            N = hidden_states.shape[1]
            target = owner.masked_fill(owner < 0, N)  # a spare slot for columns that hold no feature
            total = torch.zeros(B, N + 1, D, device=dev, dtype=full.dtype).scatter_add_(
                1, target[..., None].expand(B, L, D), full)[:, :N]
            count = torch.zeros(B, N + 1, device=dev).scatter_add_(1, target, torch.ones(B, L, device=dev))[:, :N]
            held = count > 0
            return add(hidden_states, held, (total[held] / count[held][:, None]).to(visual_embeds.dtype))
        return deepstack_process

    @staticmethod
    def _wrap_generate(generate):
        signature = inspect.signature(generate)

        @functools.wraps(generate)
        def generate_reduced(*args, **kwargs):
            try:
                given = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:  # generate itself will say what is wrong
                given = kwargs
            cfg = given.get("generation_config") or getattr(generate.__self__, "generation_config", None)
            chunk = kwargs.get("prefill_chunk_size", getattr(cfg, "prefill_chunk_size", None))
            if chunk is not None:
                # each chunk would be reduced alone, and generate slices the features by the
                # unreduced placeholder count (an IndexError after a reduction before the LLM)
                raise SiteError(f"generate(prefill_chunk_size={chunk}) runs the prompt in pieces, but a reduction "
                                "chooses its tokens over the whole prompt in one prefill: pass "
                                "prefill_chunk_size=None (or remove the reduction)")
            return generate(*args, **kwargs)
        return generate_reduced

    # -- before the LLM -----------------------------------------------------------------------
    def _vision_out(self, module, args):
        """LLaVA-1.5: the selected tower features before the projector (reduced if asked)."""
        x = args[0]
        P = 1 if self.cfg.vision_feature_select_strategy == "default" else 0
        st = self.tower_adapter._pass.after.get(self.feature_block())
        if st is None or st.pos.shape[1] - P != x.shape[1]:
            raise SiteError("vision.out: the projector input does not match the tower's feature layer "
                            f"({tuple(x.shape)}); is vision_feature_layer a single layer?")
        st = _slice_state(st, P)
        info = self.infos["vision.out"]
        stream = st.with_x(x, site="vision.out", layer=info.own_layer, depth=info.depth, info=info,
                           own_layer=info.own_layer, order="prefix")
        plans = []
        if "vision.out" in self.by_site:
            stream, plans = run_stages(stream, self.by_site["vision.out"], self.recorder)
        self._vout.append((stream.state(), P))
        return (stream.x,) + tuple(args[1:]) if plans else None

    def _wrap_features(self, fn, modality):
        @functools.wraps(fn)
        def get_features(*args, **kwargs):
            if self._in_features:  # Qwen3-VL's get_video_features calls get_image_features: reduce once
                return fn(*args, **kwargs)
            self._in_features = True
            try:
                return reduced_features(*args, **kwargs)
            finally:
                self._in_features = False

        def reduced_features(*args, **kwargs):
            if not self._features_begun:  # generate() computes features before its prefill forward
                self.recorder.begin()
                self._features_begun = True
            self._vout = []
            if self._encoder_flags:
                kwargs = {**self._encoder_flags, **kwargs}
            if modality == "video":
                args, kwargs = self._reduce_frames(args, kwargs)
            out = fn(*args, **kwargs)
            grids = kwargs.get(f"{modality}_grid_thw", args[1] if len(args) > 1 and self.kind == "qwen2_vl" else None)
            if not self.square_grids and modality == "image":
                grids = self._pixtral_grids(args, kwargs)
            self._reduce_projector_out(out, modality, grids)
            return out
        return get_features

    def _reduce_frames(self, args, kwargs):
        key = "pixel_values_videos"
        video = kwargs[key] if key in kwargs else args[0]
        self._frames_kept = None
        if video is not None and video.dim() == 5:
            self._video_frames = self._frames_total = video.shape[1]
            if FRAMES in self.by_site:
                reduced, kept = reduce_frames(video, 1, self.by_site[FRAMES], self.context, self.infos, self.recorder)
                if reduced is not None:
                    self._video_frames, self._frames_kept = reduced.shape[1], kept
                    if key in kwargs:
                        kwargs = dict(kwargs, **{key: reduced})
                    else:
                        args = (reduced,) + tuple(args[1:])
        return args, kwargs

    def _pixtral_grids(self, args, kwargs):
        """(1, rows, cols) of each image of a Pixtral tower, which keeps the image's aspect ratio,
        from the `image_sizes` of the features call (Mistral 3 passes them second, a Llava class
        by name): one token per patch_size x spatial_merge_size pixels (Mistral 3's 2x2 patch
        merger; none in a Llava class), the tokens row-major. None without image_sizes."""
        sizes = kwargs.get("image_sizes")
        if sizes is None and len(args) > 1 and torch.is_tensor(args[1]) and args[1].dim() == 2:
            sizes = args[1]
        if sizes is None:
            return None
        per_token = self.tower.patch_size * (getattr(self.cfg, "spatial_merge_size", None) or 1)
        return [(1, int(h) // per_token, int(w) // per_token) for h, w in torch.as_tensor(sizes).tolist()]

    def _fresh_item_state(self, x: Tensor, modality: str, index: int, grids) -> tuple:
        """Token bookkeeping for one item (N, D) as the projector produced it, and the number of
        placeholders the processor wrote for it (more than N when frames were dropped)."""
        N = x.shape[0]
        dev = x.device
        kind = torch.full((1, N), int(Kind.VISUAL), dtype=torch.long, device=dev)
        frame = torch.full((1, N), -1, dtype=torch.long, device=dev)
        patch = torch.full((1, N), -1, dtype=torch.long, device=dev)
        pos = torch.arange(N, device=dev)[None].clone()
        grid, n_placeholders = None, N
        newline = getattr(self.base, "image_newline", None)
        if newline is not None:
            kind[0, (x == newline.to(x.dtype)[None]).all(-1)] = int(Kind.PROTECTED)
        vis = kind[0] == int(Kind.VISUAL)
        n_vis = int(vis.sum())
        frames_kept = None
        if self.kind == "qwen2_vl" and grids is not None:
            t, h, w = (int(v) for v in grids[index])
            m = getattr(self.tower, "spatial_merge_size", 2)
            grid = (t, h // m, w // m)
        elif not self.square_grids and grids is not None and index < len(grids):
            grid = grids[index]  # a Pixtral tower's image: its own rows and columns
        elif modality == "video" and self.kind in ("onevision", "next_video") and self._video_frames:
            T = self._video_frames
            per = n_vis // T
            side = int(round(per ** 0.5))
            if per * T == n_vis:
                grid = (T, side, side) if side * side == per else (T, 1, per)
            if self._frames_kept is not None:  # frames were dropped before the tower
                frames_kept = self._frames_kept[index]
        elif self.kind in ("llava", "generic") and self.square_grids:
            side = int(round(N ** 0.5))
            grid = (1, side, side) if side * side == N else None
        if grid is not None and grid[0] * grid[1] * grid[2] == n_vis:
            per = grid[1] * grid[2]
            r = torch.arange(n_vis, device=dev)
            f, p = r // per, r % per
            if frames_kept is not None:  # positions and frame numbers of the original video
                T0 = self._frames_total
                f = frames_kept.to(dev)[f]
                extra = N - n_vis
                pos[0, vis] = f * per + p
                pos[0, ~vis] = T0 * per + torch.arange(extra, device=dev)
                n_placeholders = T0 * per + extra
                grid = (T0, grid[1], grid[2])
            frame[0, vis], patch[0, vis] = f, p
        st = TokenStream.start(x[None], kind=kind, frame=frame, pos=pos, order="prefix").state()
        st.patch, st.grid = patch, grid
        return st, n_placeholders

    def _reduce_projector_out(self, out, modality, grids):
        feats = out.pooler_output
        as_tensor = torch.is_tensor(feats)
        items = [f for f in feats]
        states = []
        vout = self._vout[-1] if modality == "image" and self._vout else None
        if vout is not None and vout[0].pos.shape[0] != len(items):
            raise SiteError(f"{len(items)} image feature items but the projector saw {vout[0].pos.shape[0]} images")
        for i, x in enumerate(items):
            if vout is not None:  # LLaVA-1.5: the tower's bookkeeping, CLS dropped by the strategy
                st, P = vout
                row = _row(st, i)
                if row.valid is not None:  # a ragged vision.out plan: padding rows never reach the LLM
                    keep = row.valid[0]
                    items[i], row = x[keep], _select(row, keep)
                states.append(_Item(row, self._placeholder_count(P), P))
            else:
                states.append(_Item(*self._fresh_item_state(x, modality, i, grids)))
        if "projector.out" in self.by_site:
            items, states = self._run_items(items, states)
        if self.position_policy == "original":  # Qwen2-VL: each token sits at its own M-RoPE position
            for i, it in enumerate(states):
                order = torch.argsort(it.state.pos[0])
                items[i], states[i] = items[i][order], _Item(_select(it.state, order), it.n, it.offset)
        deep = getattr(out, "deepstack_features", None)
        if deep and "projector.out" in self.by_site:
            # Qwen3-VL: each DeepStack level holds one tensor per item, token for token with the
            # projector's output: the same survivors, in the same order
            if any(bool((it.state.size != 1).any()) for it in states):
                raise SiteError("a merging reduction at projector.out cannot carry Qwen3-VL's DeepStack features "
                                "(one per token); use a pruning method there (random, uniform, dycoke_ttm)")
            out.deepstack_features = [type(level)(f[it.state.pos[0].to(f.device)] for f, it in zip(level, states))
                                      for level in deep]
        if as_tensor:
            lens = {t.shape[0] for t in items}
            out.pooler_output = torch.stack(items) if len(lens) == 1 else torch.cat(items)[None]
        else:
            out.pooler_output = items if isinstance(feats, list) else type(feats)(items)
        self._items[id(out)] = (modality, states)
        # with the site records of the reduction, so a forward that reuses the features reports them
        sites = {k: dataclasses.replace(v) for k, v in self.recorder.last.sites.items()}
        with self._reduced_lock:
            self._reduced = {k: v for k, v in self._reduced.items() if v[0]() is not None}
            self._reduced[id(out)] = (weakref.ref(out), (modality, states), sites)

    def _placeholder_count(self, P) -> int:
        """LLaVA-1.5: the processor puts one placeholder per token of the unreduced tower."""
        return self.tower_adapter._pass.n0 - P

    def _run_items(self, items, states):
        info = self.infos["projector.out"]
        reds = self.by_site["projector.out"]
        groups: dict = {}
        for i, x in enumerate(items):
            # one run per (count, grid): stacked items share the first one's grid, so a 2x4 and a
            # 4x2 image (or videos of 2x4x8 and 4x4x4 patches) must not run together
            groups.setdefault((x.shape[0], states[i].state.grid), []).append(i)
        items, states = list(items), list(states)
        for idx in groups.values():
            x = torch.stack([items[i] for i in idx])
            st = _stack_states([states[i].state for i in idx])
            # the LLM reads these tokens in sequence order (newline tokens sit between rows)
            stream = st.with_x(x, site="projector.out", layer=None, depth=info.depth, info=info,
                               own_layer=info.own_layer, order="sequence")
            stream, plans = run_stages(stream, reds, self.recorder)
            for r, i in enumerate(idx):
                row = _row(stream.state(), r)
                xr = stream.x[r]
                if stream.valid is not None:
                    keep = stream.valid[r]
                    xr, row = xr[keep], _select(row, keep)
                items[i] = xr
                states[i] = _Item(row, states[i].n, states[i].offset)
        if len(groups) > 1 and self.recorder.trace_enabled:  # each group's run wrote its own trace
            self.recorder.last.trace["projector.out"] = _items_trace([it.state for it in states])
        return items, states

    # -- the prompt: shorten placeholder runs -------------------------------------------------
    def _model_pre(self, module, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            kwargs["input_ids"], args = args[0], tuple(args[1:])
        ids = kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        refuse_fixed_size_cache(cache)
        prefill = cache is None or cache.get_seq_length() == 0
        self._prefill_pass = prefill
        if not prefill:
            self.prompt = self.prompts.lookup(cache, self.prompt)
            return (args, self._decode_inputs(kwargs)) if self.prompt is not None else None
        pre = kwargs.get("mm_encoder_outputs") or {}
        if not (self._features_begun and any(v is not None and id(v) in self._items for v in pre.values())):
            # not generate()'s features computed for this prefill: a new record (a standalone
            # get_*_features call before it opened one too, and its entries are not this forward's)
            self.recorder.begin()
            self._items.clear()
        self._features_begun = False
        self.prompt = None
        self.llm.labels = None
        if ids is None:
            if kwargs.get("inputs_embeds") is not None and (
                    any(kwargs.get(k) is not None for k in PIXEL_KEYS) or any(v is not None for v in pre.values())):
                # the visual tokens are found (and the prompt shortened) by their placeholder ids
                raise SiteError("a reduced VLM needs input_ids to find the visual tokens in the prompt; it was "
                                "called with inputs_embeds and images / videos: pass input_ids instead (or "
                                "remove the reduction)")
            return None
        if self.kind == "qwen2_vl" and kwargs.get("position_ids") is None and (
                kwargs.get("image_grid_thw") is not None or kwargs.get("video_grid_thw") is not None):
            # Qwen2.5-VL's video positions also take the seconds per temporal patch
            extra = {"second_per_grid_ts": kwargs["second_per_grid_ts"]} \
                if kwargs.get("second_per_grid_ts") is not None else {}
            pos, deltas = self.base.get_rope_index(
                ids, mm_token_type_ids=kwargs.get("mm_token_type_ids"), image_grid_thw=kwargs.get("image_grid_thw"),
                video_grid_thw=kwargs.get("video_grid_thw"), attention_mask=kwargs.get("attention_mask"), **extra)
            kwargs["position_ids"] = pos
            self.base.rope_deltas = deltas
        if any(kwargs.get(k) is not None for k in PIXEL_KEYS):
            self._features_begun = True  # this forward's record is already open
            # generate's helper passes only the features call's named parameters; the unreduced
            # forward of LLaVA-1.5 and Qwen2-VL also passes its output flags (the tower's hidden
            # states / attentions come back in image_outputs), the others' do not
            if self.kind in ("llava", "qwen2_vl"):
                self._encoder_flags = {k: kwargs[k] for k in ("output_hidden_states", "output_attentions")
                                       if kwargs.get(k) is not None}
            try:
                kwargs = self.model._prepare_multimodal_encoder_kwargs_for_generation(kwargs)
            finally:
                self._features_begun, self._encoder_flags = False, {}
        mm = kwargs.get("mm_encoder_outputs") or {}
        plan = []  # (token id, [items])
        for modality, token in (("image", self.image_token), ("video", self.video_token)):
            out = mm.get(modality)
            if out is None:
                continue
            rec = self._items.pop(id(out), None)
            with self._reduced_lock:
                earlier = self._reduced.get(id(out)) if rec is None else None
            if earlier is not None and earlier[0]() is out:
                _, rec, sites = earlier  # features reduced at an earlier step (or thread), fed again
                for k, v in sites.items():
                    self.recorder.last.sites.setdefault(k, dataclasses.replace(v))
            if rec is None:  # features computed elsewhere: take them as they are
                feats = out.pooler_output
                feats = list(feats) if not torch.is_tensor(feats) else [f for f in feats]
                rec = (modality, [_Item(*self._fresh_item_state(f, modality, i, None)) for i, f in enumerate(feats)])
            plan.append((token, rec[1]))
        self._items = {}
        kwargs = self._shorten(kwargs, plan)
        self.prompts.bind(cache, self.prompt)
        labels = kwargs.get("labels")
        if self.llm.by_site and torch.is_tensor(labels):
            # dropped positions inside the LLM are masked out of the loss on a copy, never the caller's tensor
            kwargs["labels"] = self.llm.labels = labels.clone()
        return args, kwargs

    def _shorten(self, kwargs, plan):
        ids = kwargs["input_ids"]
        B, L = ids.shape
        dev = ids.device
        keep = torch.ones(B, L, dtype=torch.bool, device=dev)
        kind = torch.full((B, L), int(Kind.TEXT), dtype=torch.long, device=dev)
        frame = torch.full((B, L), -1, dtype=torch.long, device=dev)
        patch = torch.full((B, L), -1, dtype=torch.long, device=dev)
        item = torch.full((B, L), -1, dtype=torch.long, device=dev)
        items_in_row = [0] * B
        size = torch.ones(B, L, device=dev)
        changed = False
        row_grids = [set() for _ in range(B)]
        for token, items in plan:
            cols = (ids == token).nonzero()  # row-major: (b, col)
            start = 0
            for it in items:
                run = cols[start:start + it.n]
                start += it.n
                if len(run) != it.n:
                    raise SiteError(f"the prompt has fewer placeholder tokens ({token}) than the features need")
                b = int(run[0, 0])
                row_grids[b].add(it.state.grid)
                item_pos = (it.state.pos[0] - it.offset).clamp(min=0, max=it.n - 1)
                keep[b, run[:, 1]] = False
                # the features fill the kept placeholders in column order (masked_scatter), so the
                # k-th feature's bookkeeping goes to the k-th kept column
                chosen = run[item_pos.sort().values, 1]
                keep[b, chosen] = True
                kind[b, chosen] = it.state.kind[0]
                frame[b, chosen] = it.state.frame[0]
                patch[b, chosen] = it.state.patch[0] if it.state.patch is not None else -1
                size[b, chosen] = it.state.size[0]
                item[b, chosen] = items_in_row[b]
                items_in_row[b] += 1
                changed |= len(chosen) != it.n
            if start != len(cols):
                hint = ""
                if start and len(cols) % start == 0:  # generate() repeated the prompt rows, not the features
                    hint = ("; generate(num_beams > 1 or num_return_sequences > 1) repeats the prompt after the "
                            "features are computed, which a reduced model does not support: use num_beams=1 and "
                            "num_return_sequences=1 (repeat the inputs yourself for several samples)")
                raise SiteError(f"the prompt has {len(cols)} placeholder tokens ({token}) but the features fill "
                                f"{start}{hint}")
        am = kwargs.get("attention_mask")
        valid0 = am.bool() if am is not None else torch.ones(B, L, dtype=torch.bool, device=dev)
        counts = keep.sum(1)
        Lp = int(counts.max())
        # new layout: kept columns of each sample, left padded to the longest
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :Lp]
        slot = torch.arange(Lp, device=dev)[None]
        pad = slot < (Lp - counts)[:, None]
        shift = (Lp - counts)[:, None]
        src = (slot - shift).clamp(min=0)
        col_map = order.gather(1, src).masked_fill(pad, -1)
        new = {}
        for key, fill in SEQ_KEYS.items():
            t = kwargs.get(key)
            if torch.is_tensor(t) and t.shape == (B, L):
                g = t.gather(1, col_map.clamp(min=0))
                new[key] = g.masked_fill(pad, fill)
        if "attention_mask" not in new and bool(pad.any()):
            new["attention_mask"] = (~pad).long()
        valid = (~pad) & valid0.gather(1, col_map.clamp(min=0))
        pos = kwargs.get("position_ids")
        if pos is not None:
            if self.position_policy == "original" or not changed:
                g = gather_positions(pos, col_map.clamp(min=0))
                g = g.masked_fill(pad, 0) if g.dim() == 2 else g.masked_fill(pad[None], 0)
                if changed and g.dim() == 3 and g.shape[0] == 4:
                    # Qwen's [text; t; h; w] rows (generate's layout): with no mask and no cache,
                    # transformers reads a jump in the text row as the start of another packed
                    # sequence and blocks attention across it; the survivors are one sequence,
                    # so the text row counts them (the rotary phases stay in the M-RoPE rows)
                    g = torch.cat([(valid.long().cumsum(-1) - 1).clamp(min=0)[None].to(g.dtype), g[1:]])
                new["position_ids"] = g
            else:  # contiguous re-index over the shortened prompt, from the row's own first position
                # (generate counts from 0, PaliGemma from 1; the decode steps subtract the dropped count)
                first = pos.masked_fill(~valid0, torch.iinfo(pos.dtype).max).amin(1, keepdim=True)
                first = torch.where(valid0.any(1, keepdim=True), first, torch.zeros_like(first))
                new["position_ids"] = first + (valid.long().cumsum(-1) - 1).clamp(min=0)
        kwargs.update(new)
        dropped = valid0.sum(1) - valid.sum(1)
        if changed or bool(pad.any()):
            self.prompt = _Prompt(col_map, L, dropped, valid0.sum(1))
        g = lambda t: t.gather(1, col_map.clamp(min=0))
        # the items' common (T, H, W) grid, so spatial reducers (uniform, ATP) see the layout in the
        # LLM too; where the samples' grids differ, each sample's own (rows with one grid)
        grids = set().union(*row_grids)
        per_row = None
        if len(grids) > 1:
            per_row = tuple(next(iter(g)) if len(g) == 1 else None for g in row_grids)
        tpl = TokenStream(x=None, pos=torch.arange(Lp, device=dev).expand(B, Lp).clone(), size=g(size),
                          kind=g(kind).masked_fill(pad, int(Kind.TEXT)), frame=g(frame).masked_fill(pad, -1),
                          valid=valid, order="sequence", patch=g(patch).masked_fill(pad, -1),
                          grid=grids.pop() if len(grids) == 1 else None, row_grids=per_row,
                          item=g(item).masked_fill(pad, -1) if max(items_in_row) > 1 else None)
        self.llm.pending_template = tpl
        # device scalars, read back with the statistics (PassRecord.resolve), not here
        self.recorder.last.extra["prompt_tokens"] = valid0.sum(1).float().mean()
        self.recorder.last.extra["llm_input_tokens"] = valid.sum(1).float().mean()
        return kwargs

    def _decode_inputs(self, kwargs):
        p = self.prompt
        am = kwargs.get("attention_mask")
        ids, cache = kwargs.get("input_ids"), kwargs.get("cache", kwargs.get("past_key_values"))
        if ids is not None and ids.shape[1] > 1 and cache is not None:
            self._check_continuation(p, am, kwargs.get("position_ids"), ids.shape[1], cache)
        if am is not None and am.dim() == 2 and am.shape[1] > p.col_map.shape[1]:
            head = am[:, :p.L_full].gather(1, p.col_map.clamp(min=0)).masked_fill(p.col_map < 0, 0)
            kwargs["attention_mask"] = torch.cat([head, am[:, p.L_full:]], dim=1)
        pos = kwargs.get("position_ids")
        if self.position_policy == "contiguous":
            if pos is not None and pos.dim() == 2:
                kwargs["position_ids"] = pos - p.dropped[:, None].to(pos.dtype)
        elif pos is None and am is not None and self.base.rope_deltas is not None:
            q = kwargs["input_ids"].shape[1]
            text = (am.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]
            kwargs["position_ids"] = text[None].expand(3, -1, -1) + self.base.rope_deltas[None]
        return kwargs

    @staticmethod
    def _check_continuation(p, am, pos, q, cache):
        """Several new tokens on a reduced prompt's cache (prompt-lookup candidates, or a caller
        feeding new tokens): they must start where the cache ends, counted past the prompt.
        generate(past_key_values=<an earlier turn's cache>) slices its input by the cache's
        length, which the reduction shortened, and would feed old tokens again."""
        cached = cache.get_seq_length() - p.col_map.shape[1]
        if am is not None and am.dim() == 2:
            caller = torch.tensor([am.shape[1] - q - p.L_full])
        elif pos is not None and pos.dim() == 2:
            caller = pos[:, 0].cpu() - p.real.cpu()
        else:
            return
        if bool((caller != cached).any()):
            raise SiteError(f"new tokens start {caller.tolist()} tokens after the reduced prompt but its cache holds "
                            f"{cached}: continuing a conversation by passing an earlier turn's past_key_values to "
                            "generate() is not supported when a reduction shortened the prompt (run the whole "
                            "conversation as one prompt, or feed only the new tokens with the full attention mask)")

    def _model_post(self, module, args, output):
        prefill, self._prefill_pass = self._prefill_pass, False
        p = self.prompt
        if not prefill:  # decode steps: outputs at their own (new tokens') length
            return None
        self.prompts.bind(output_cache(output), p)  # a cache the model made itself
        if isinstance(output, tuple):  # return_dict=False: (loss,) logits, ...
            at = 1 if output and torch.is_tensor(output[0]) and output[0].dim() == 0 else 0
            logits = output[at] if len(output) > at else None
        else:
            logits = getattr(output, "logits", None)
        if p is None:
            return None
        cols, slot, Lp = p.col_map.clamp(min=0), p.col_map >= 0, p.col_map.shape[1]
        # logits at the prompt's length come back at the caller's; logits_to_keep's last ones stay
        realign = lambda t: scatter_to_input(t, cols, slot, p.L_full)  # noqa: E731
        keep_logits = logits is None or logits.shape[1] != Lp

        def per_layer(every, dim):
            """the LLM's per-layer hidden states (dim 3) or attention weights (dim 4), from the
            shortened prompt's length to the caller's"""
            if not (isinstance(every, tuple) and every and all(torch.is_tensor(h) and h.dim() == dim for h in every)):
                return every
            if dim == 3:
                return tuple(realign(h) if h.shape[1] == Lp else h for h in every)
            return tuple(scatter_attention_to_input(a, cols, slot, p.L_full) if a.shape[-1] == Lp else a
                         for a in every)
        if isinstance(output, tuple):  # (loss,) logits, past, hidden states, attentions, ...
            return tuple((v if keep_logits else realign(v)) if i == at else per_layer(per_layer(v, 3), 4)
                         for i, v in enumerate(output))
        if not keep_logits:
            output.logits = realign(logits)
        for name, dim in (("hidden_states", 3), ("attentions", 4)):
            if getattr(output, name, None) is not None:
                setattr(output, name, per_layer(getattr(output, name), dim))
        return output

    # -- stats --------------------------------------------------------------------------------
    def flops(self, record):
        parts = [f for f in (self.llm.flops(record),
                             self.tower_adapter.flops(record) if self._tower_reduced else None) if f]
        if not parts:
            return None
        return sum(p[0] for p in parts), sum(p[1] for p in parts)


# -- state helpers ---------------------------------------------------------------------------------
_FIELDS = ("pos", "size", "kind", "frame", "patch", "valid", "source")


def _map_state(st: TokenStream, fn, num_protected=None) -> TokenStream:
    """fn applied to each per-token field; num_protected: the leading protected tokens after it
    (None = not known on the host)"""
    from dataclasses import replace
    return replace(st, num_protected=num_protected,
                   **{f: fn(getattr(st, f)) for f in _FIELDS if getattr(st, f) is not None})


def _slice_state(st, P):
    """the state without its first P (protected) tokens"""
    if not P:
        return st
    return _map_state(st, lambda t: t[:, P:],
                      None if st.num_protected is None else max(0, st.num_protected - P))


def _row(st, b):
    return _map_state(st, lambda t: t[b:b + 1], st.num_protected)


def _select(st, keep):
    return _map_state(st, lambda t: t[:, keep])


def _items_trace(states) -> dict:
    """The site trace over items of different token counts, one row per item in item order:
    rows padded to the longest (pos / frame -1, size 0, valid False, source zeros)."""
    K = max(st.pos.shape[1] for st in states)
    pad = lambda t, fill: torch.nn.functional.pad(t, (0, K - t.shape[1]), value=fill)  # noqa: E731
    out = {"pos": torch.cat([pad(st.pos, -1) for st in states]),
           "size": torch.cat([pad(st.size, 0) for st in states]),
           "frame": torch.cat([pad(st.frame, -1) for st in states]),
           "valid": torch.cat([pad(torch.ones_like(st.pos, dtype=torch.bool), False) for st in states]),
           "source": None}
    if all(st.source is not None for st in states):
        N = max(st.source.shape[2] for st in states)
        out["source"] = torch.cat([torch.nn.functional.pad(st.source, (0, N - st.source.shape[2], 0,
                                                                       K - st.source.shape[1])) for st in states])
    return out


def _stack_states(states):
    from dataclasses import replace
    first = states[0]
    same = all(s.num_protected == first.num_protected for s in states)
    return replace(first, num_protected=first.num_protected if same else None,
                   **{f: torch.cat([getattr(s, f) for s in states]) for f in _FIELDS if getattr(first, f) is not None})
