"""`llm.layer.{k}` sites inside a Hugging Face decoder LM (Llama, Qwen2, Qwen2-VL's text model...).

Prefill: a forward pre-hook on decoder layer k runs the stages on the hidden states and gathers
the per-layer side inputs every later layer receives (rotary cos/sin, position ids, the 4-D
mask on both axes). Survivors keep their original RoPE positions. Each layer's KV cache keeps
the length that layer saw. Decode: layers after a reduction get a mask rebuilt for their own
cache length (kept prefill columns + new tokens), so the key axis lines up with their cache.
Ragged plans (per-sample counts differ) become right padding masked out as keys.

Attention rows come from a wrapper registered through transformers' AttentionInterface
("tokenreduce_<impl>"): it sees post-RoPE q/k of the layers a reducer asked about, computes the
few rows needed and delegates to the model's own implementation (SDPA stays on, no layer runs
twice). The wrapper is inert for every module without a capture callback.
"""
from __future__ import annotations

import sys
import weakref
from functools import partial

import torch
from torch import Tensor

from tokenreduce.errors import SiteError
from tokenreduce.flops import attention_flops, linear_macs
from tokenreduce.hooks import run_stages
from tokenreduce.signals import last_query_attention
from tokenreduce.stream import Kind, TokenStream

from .base import ByCache, PerThreadState, site

PREFIX = "tokenreduce_"
CAPTURE_ATTR = "_tokenreduce_capture"


# -- attention interface wrapper ----------------------------------------------------------------
def _base_attention(impl: str, module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if impl == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def _make_wrapper(impl: str):
    def tokenreduce_attention(module, query, key, value, attention_mask, **kwargs):
        cb = module.__dict__.get(CAPTURE_ATTR)
        if cb is not None:
            cb(query, key, attention_mask, kwargs.get("scaling", getattr(module, "scaling", None)))
        return _base_attention(impl, module)(module, query, key, value, attention_mask, **kwargs)
    tokenreduce_attention.__name__ = f"{PREFIX}{impl}"
    return tokenreduce_attention


def wrapped_attention_name(impl: str) -> str:
    """Register (once) `tokenreduce_<impl>`: the model's own attention plus score capture."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    impl = impl or "eager"
    if impl.startswith(PREFIX):
        return impl
    name = PREFIX + impl
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_wrapper(impl))
    if impl in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping and name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[impl])
    return name


# id(config) -> {"ref", "old", "wrapped", "count"}: models built from one config object share it
# (transformers does not copy it), so two reduced models wrap its attention once, and only the
# last remove() puts the original back
_WRAPPED_CONFIGS: dict = {}


def _wrap_config_attention(cfg):
    """Set cfg's attention implementation to its score-capturing wrapper; returns the undo."""
    key = id(cfg)
    entry = _WRAPPED_CONFIGS.get(key)
    if entry is None or entry["ref"]() is not cfg or cfg._attn_implementation != entry["wrapped"]:
        old = cfg._attn_implementation
        entry = _WRAPPED_CONFIGS[key] = {"ref": weakref.ref(cfg), "old": old,
                                         "wrapped": wrapped_attention_name(old), "count": 0}
        cfg._attn_implementation = entry["wrapped"]
    entry["count"] += 1

    def restore():
        entry["count"] -= 1
        if entry["count"] > 0:
            return  # another reduced model still runs on this config
        if _WRAPPED_CONFIGS.get(key) is entry:
            del _WRAPPED_CONFIGS[key]
        if cfg._attn_implementation == entry["wrapped"]:  # unless the user set another one since
            cfg._attn_implementation = entry["old"]
    return restore


def output_cache(output):
    """The KV cache a forward returned (a model output's `cache`, or the one in a return_dict=False tuple)."""
    if isinstance(output, tuple):
        return next((v for v in output if hasattr(v, "get_seq_length")), None)
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


def _cached(cache, layer: int) -> int:
    """Tokens a KV cache holds for one layer (caches without per-layer lengths: their length)."""
    try:
        return cache.get_seq_length(layer)
    except TypeError:
        return cache.get_seq_length()


def refuse_fixed_size_cache(cache) -> None:
    """A static (compileable, preallocated) cache: its masks and slots are laid out for the full
    prompt, so removed tokens cannot be followed; say so instead of failing inside the model."""
    if getattr(cache, "is_compileable", False):
        raise SiteError(f"{type(cache).__name__} (a fixed-size cache, e.g. generate(cache_implementation='static')) "
                        "cannot follow the tokens a reduction removes; use the default dynamic cache")


# -- tensor helpers -------------------------------------------------------------------------------
def gather_seq(t, idx: Tensor, dim: int):
    """Gather axis `dim` of `t` (batch first) with idx (B, L'); a broadcast batch of 1 is expanded."""
    if t is None or not torch.is_tensor(t):
        return t
    B = idx.shape[0]
    if t.shape[0] == 1 and B > 1:
        t = t.expand(B, *t.shape[1:])
    shape = [1] * t.dim()
    shape[0], shape[dim] = B, idx.shape[1]
    index = idx.reshape(shape).expand(*[idx.shape[1] if d == dim else t.shape[d] for d in range(t.dim())])
    return t.gather(dim, index)


def gather_positions(pos, idx: Tensor):
    """position_ids (B, L), (1, L) or M-RoPE (3|4, B, L): gather the last axis."""
    if pos is None:
        return None
    if pos.dim() == 2:
        return gather_seq(pos, idx, 1)
    if pos.shape[1] == 1 and idx.shape[0] > 1:
        pos = pos.expand(pos.shape[0], idx.shape[0], pos.shape[2])
    return pos.gather(2, idx[None].expand(pos.shape[0], -1, -1))


def gather_rotary(pe, idx: Tensor):
    """(cos, sin) of shape (B|1, L, D) or (3, B|1, L, D) (M-RoPE): gather the token axis."""
    if pe is None:
        return None
    out = []
    for t in pe:
        if t.dim() == 4:  # (3, B, L, D)
            if t.shape[1] == 1 and idx.shape[0] > 1:
                t = t.expand(t.shape[0], idx.shape[0], *t.shape[2:])
            out.append(t.gather(2, idx[None, :, :, None].expand(t.shape[0], -1, -1, t.shape[-1])))
        else:
            out.append(gather_seq(t, idx, 1))
    return tuple(out)


def mask_from_valid(kv_valid: Tensor, q_len: int, like, causal: bool, window=None) -> Tensor | None:
    """A 4-D mask (B, 1, q, K) in the format of `like` (bool: True = attend; float: additive).
    window: (key_index (B, K), query_index (q,), W) for a sliding-window layer: a query sees only
    the keys less than W indices (of the LLM's input sequence) before it, as the unreduced mask."""
    B, K = kv_valid.shape
    allowed = kv_valid[:, None, None, :].expand(B, 1, q_len, K)
    if causal and q_len > 1:
        qpos = torch.arange(K - q_len, K, device=kv_valid.device)
        allowed = allowed & (torch.arange(K, device=kv_valid.device)[None, :] <= qpos[:, None])[None, None]
    if window is not None:
        key_index, query_index, W = window
        allowed = allowed & (key_index[:, None, None, :] > (query_index - W)[None, None, :, None])
    if like is None or like.dtype == torch.bool:
        return allowed
    out = torch.zeros(allowed.shape, dtype=like.dtype, device=like.device)
    return out.masked_fill(~allowed, torch.finfo(like.dtype).min)


def reindex_mask(mask, idx: Tensor, valid: Tensor | None):
    """Gather both axes of a prefill mask; keys in padding slots are masked out."""
    if mask is None or not torch.is_tensor(mask):
        if valid is None:
            return mask
        L = idx.shape[1]
        return mask_from_valid(valid, L, None, causal=True)
    if mask.dim() == 2:  # flash-style (B, L) padding mask
        m = gather_seq(mask, idx, 1)
        return m if valid is None else m * valid.to(m.dtype)
    m = gather_seq(mask, idx, 2)
    m = gather_seq(m, idx, 3)
    if valid is not None:
        if m.dtype == torch.bool:
            m = m & valid[:, None, None, :]
        else:
            m = m.masked_fill(~valid[:, None, None, :], torch.finfo(m.dtype).min)
    return m


def scatter_to_input(h: Tensor, cols: Tensor, slot: Tensor, length: int) -> Tensor:
    """(B, L_j, C) -> (B, length, C): each row at its input column `cols`, zeros where nothing is
    (dropped positions); padding slots (slot False) go to a spare column that is cut off"""
    full = h.new_zeros(h.shape[0], length + 1, h.shape[-1])
    full.scatter_(1, cols.masked_fill(~slot, length)[..., None].expand_as(h), h)
    return full[:, :length]


def scatter_attention_to_input(a: Tensor, cols: Tensor, slot: Tensor, length: int) -> Tensor:
    """(B, H, L_j, L_j) attention weights -> (B, H, length, length): queries and keys at their
    input columns, zeros where a position was dropped; padding slots are cut off"""
    B, H, Lq, Lk = a.shape
    idx = cols.masked_fill(~slot, length)
    by_key = a.new_zeros(B, H, Lq, length + 1)
    by_key.scatter_(3, idx[:, None, None, :].expand(B, H, Lq, Lk), a)
    full = a.new_zeros(B, H, length + 1, length + 1)
    full.scatter_(2, idx[:, None, :, None].expand(B, H, Lq, length + 1), by_key)
    return full[:, :, :length, :length]


def _fold_owner(owner: Tensor, plan, n: int) -> Tensor:
    """owner (B, L0): the current token (0..n-1) each input column is in, -1 once dropped; after
    `plan`, the kept slot it is in (a merged token's columns follow it)."""
    B, K = plan.keep.shape
    if plan.assign is not None:
        new = plan.assign
        if plan.valid is not None:  # padding slots of a ragged plan hold nothing
            new = torch.where(plan.valid.gather(1, new.clamp(min=0)), new, -1)
    else:  # each kept token to its slot; padding slots write to a spare column
        keep = plan.keep if plan.valid is None else plan.keep.masked_fill(~plan.valid, n)
        new = torch.full((B, n + 1), -1, dtype=torch.long, device=owner.device)
        new = new.scatter_(1, keep, torch.arange(K, device=owner.device).expand(B, K))[:, :n]
    return torch.where(owner >= 0, new.gather(1, owner.clamp(min=0)), owner)


def sliding_window_of(cache, j: int):
    """W when layer j of `cache` is a sliding-window layer (it keeps the last W - 1 tokens), else None"""
    layers = getattr(cache, "layers", None)
    if layers is None or j >= len(layers) or not getattr(layers[j], "is_sliding", False):
        return None
    return int(layers[j].sliding_window)


class _Session:
    """What one prefill decided, kept for the decode steps that follow it."""

    def __init__(self, state: TokenStream):
        self.state = state          # the stream's bookkeeping after the latest site
        self.cols: dict = {}      # layer -> (B, L_j) indices into the LLM input sequence
        self.sizes: dict = {}     # layer -> (B, L_j) token sizes (proportional attention)
        self.valid: dict = {}     # layer -> (B, L_j) bool: real (not padding) key columns
        self.slots: dict = {}     # layer -> (B, L_j) bool: False for padding slots of ragged plans
        self.cur_cols = None
        self.owner = None         # (B, L0) the current token each input column is in (merged or kept), -1 = dropped
        self.cur_valid = None     # (B, L_j) real tokens: neither prompt padding nor plan padding
        self.cur_slot = None      # (B, L_j) False for padding slots a ragged plan introduced
        self.L0 = 0
        self.start_valid = None   # (B, L0) real prompt tokens at the prefill (None: all)
        self.changed = False
        self.scatter_pending = False
        # host-side flags, so per-layer hooks need no device sync
        self.ragged = False       # a ragged plan introduced padding slots
        self.ragged_at: dict = {}  # layer -> whether its keys hold such slots
        self.sized = False        # sizes left 1 (a merge folded tokens, or a soft mask)
        self.prompt_padded = True  # the prompt itself has padding
        self.reused: dict = {}    # kind -> (inputs, result) of one forward's per-layer gathers

    def reuse(self, kind, inputs: tuple, make):
        """make() once while `inputs` stay the same objects (ints: equal): the layers after a
        reduction receive the model's one rotary table, position ids and mask, and gather them
        with the same indices, so one gather serves them all (held for one forward only)."""
        hit = self.reused.get(kind)
        if hit is not None and len(hit[0]) == len(inputs) and all(
                a is b or (type(a) is int and type(b) is int and a == b) for a, b in zip(hit[0], inputs)):
            return hit[1]
        out = make()
        self.reused[kind] = (inputs, out)
        return out


class LLMSites(PerThreadState):
    """The llm.layer.{k} sites of one decoder LM; owned by a VLM adapter. A forward's state
    (PER_FORWARD) is per thread, like the adapter's."""

    PER_FORWARD = {
        "session": None,            # _Session: what this prefill decided, for its decode steps
        "pending_template": None,   # TokenStream bookkeeping of the shortened prompt, for the next prefill
        # the forward's labels (a copy the adapter owns, aligned with the LLM input): a position
        # dropped inside the LLM predicts nothing, so the label it would predict is ignored (-100)
        "labels": None,
        "prop_attn": bool,          # some reducer asks for log(size) attention biases in this forward
        "prefilling": bool,         # this thread's forward is a prefill (its cache gets the session)
    }

    def __init__(self, lm, hooks, recorder):
        self.lm = lm
        self.layers = list(lm.layers)
        self.hooks = hooks
        self.recorder = recorder
        self.by_site: dict = {}
        # each prefill's session, by the KV cache it filled: decode steps find it from any thread
        self.sessions = ByCache()

    @property
    def depth(self) -> int:
        return len(self.layers)

    def site_infos(self) -> dict:
        out = {}
        for k in range(self.depth):
            n = f"llm.layer.{k}"
            sig = {"x", "qk", "last_query_attn"} if k > 0 else {"x"}
            out[n] = site(n, "llm.layer", k, self.depth, sig, own_layer=k - 1 if k else None,
                          note="" if k else "no layer has run before llm.layer.0")
        return out

    # -- install ------------------------------------------------------------------------------
    def install(self, stages: list) -> None:
        infos = self.site_infos()
        self.infos = infos
        for name, red in stages:
            self.by_site.setdefault(name, []).append(red)
        if not self.by_site:
            return
        impl = self.lm.config._attn_implementation or ""
        if "flex" in impl:  # its block mask is built for the full prompt length before layer 0
            raise SiteError(f"llm.layer sites need attn_implementation 'sdpa' or 'eager' in the LLM; it uses "
                            f"{impl!r} (load the model with attn_implementation='sdpa')")
        self.first = min(int(n.rsplit(".", 1)[1]) for n in self.by_site)
        capture, self.consumers = {}, {}
        self._stages = stages
        for name, red in stages:
            info = infos[name]
            for sig, layers in red.needs(info).signals.items():
                for l in layers:
                    l = info.own_layer if l is None else l
                    if sig != "x":
                        capture.setdefault(l, set()).add(sig)
                        if not any(r is red for r in self.consumers.setdefault(l, [])):
                            self.consumers[l].append(red)
        self.capture = capture
        H = self.hooks
        H.pre(self.lm, self._lm_pre, with_kwargs=True)
        H.post(self.lm, self._lm_post)
        for j in range(self.first, self.depth):
            H.pre(self.layers[j], partial(self._layer_pre, j), with_kwargs=True)
        if capture:
            H.on_remove(_wrap_config_attention(self.lm.config))
            for j, sigs in capture.items():
                attn = self.layers[j].self_attn
                H.setattr(attn, CAPTURE_ATTR, partial(self._on_attention, j, sigs))

    # -- hooks --------------------------------------------------------------------------------
    def _lm_pre(self, module, args, kwargs):
        """A prefill starts a session before any layer runs (signal layers may precede sites)."""
        refuse_fixed_size_cache(kwargs.get("past_key_values"))
        impl = self.lm.config._attn_implementation or ""
        if "flex" in impl or (self.capture and not impl.startswith(PREFIX)):
            raise SiteError(f"the LLM's attention implementation changed after reduce() (it is now {impl!r}); "
                            "llm.layer sites need 'sdpa' or 'eager' set before reduce(): remove the reduction, "
                            "set the implementation, and reduce again")
        if torch.is_grad_enabled() and any(getattr(layer, "gradient_checkpointing", False) is True and layer.training
                                           for layer in self.layers):
            # the backward pass re-runs each decoder layer, whose hooks would see the tokens of the
            # end of the forward (the same refusal as the vision tower's)
            raise SiteError("gradient checkpointing is on in the LLM: it re-runs each decoder layer in the backward "
                            "pass, which llm.layer reductions do not support; turn it off "
                            "(model.activation_checkpointing_disable()), reduce before the LLM (projector.out), or "
                            "run without grad")
        # read per forward: a reducer may ask for proportional attention in one mode only (ATP's
        # soft masks while it trains)
        self.prop_attn = any(red.needs(self.infos[name]).prop_attn for name, red in self._stages)
        hs = kwargs.get("inputs_embeds")
        if hs is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            hs = torch.empty(*ids.shape, 0, device=ids.device) if ids is not None else None  # shape only
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.prefilling = False
        if hs is None:
            return None
        if self._is_prefill(0, hs, kwargs):
            self.sessions.bind(cache, self._start(hs, kwargs))
            self.prefilling = True
        elif cache is None or _cached(cache, 0) == 0:
            self.session = None  # a one-token prompt: nothing of an earlier prefill applies
        else:  # a decode step: the session of the prefill that filled this cache
            self.session = self.sessions.lookup(cache, self.session)
            self._check_continuation(hs.shape[1], kwargs)
        return None

    def _check_continuation(self, q: int, kwargs) -> None:
        """New tokens after a prefill whose first layer's cache was shortened (a reduction at
        llm.layer.0): generate(past_key_values=<an earlier turn's cache>) slices its input by that
        layer's length and would feed old tokens again. The caller's mask (past + new tokens) must
        match what the cache holds, counted at the prompt's full length."""
        s, am, pos = self.session, kwargs.get("attention_mask"), kwargs.get("position_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if s is None or 0 not in s.cols or cache is None:
            return
        K0 = s.cols[0].shape[1]
        if K0 == s.L0:
            return
        past0 = _cached(cache, 0)
        decoded = past0 - K0  # tokens cached since the prefill
        if torch.is_tensor(am) and am.dim() == 2:  # the caller's mask covers its past and the new tokens
            off = am.shape[1] - q - (s.L0 + decoded)
        elif torch.is_tensor(pos) and pos.dim() == 2 and q > 1:
            # 1-D RoPE: the first new token's position (a device sync, so only for several new
            # tokens, as a new turn brings; one-token decode steps follow their cache)
            real = s.start_valid.sum(1) if s.start_valid is not None else torch.full((pos.shape[0],), s.L0)
            off = int((pos[:, 0].cpu() - real.cpu() - decoded).abs().max())
        else:
            return
        if off:
            raise SiteError(f"new tokens start {off} tokens away from where the reduced "
                            f"prompt's cache ends (it holds {past0} tokens: {K0} of the {s.L0}-token prompt after "
                            "llm.layer.0, then the decoded ones): continuing a conversation by passing an earlier "
                            "turn's past_key_values to generate() is not supported when a reduction shortened the "
                            "prompt (run the whole conversation as one prompt, or feed only the new tokens with the "
                            "full attention mask)")

    def _start(self, hs: Tensor, kwargs) -> _Session:
        tpl = self.pending_template
        self.pending_template = None
        B, L = hs.shape[:2]
        if tpl is None or tpl.pos.shape != (B, L):
            am = kwargs.get("attention_mask")
            tpl = TokenStream.start(hs, kind=torch.full((B, L), int(Kind.TEXT), dtype=torch.long, device=hs.device),
                                    order="sequence").state()
            if torch.is_tensor(am) and am.shape == (B, L):  # a text-only prompt: padding is not a token
                tpl.valid = am.bool()
        s = _Session(tpl)
        s.L0 = L
        s.cur_cols = torch.arange(L, device=hs.device).expand(B, L)
        s.owner = s.cur_cols
        s.cur_slot = torch.ones(B, L, dtype=torch.bool, device=hs.device)
        s.prompt_padded = tpl.valid is not None and not bool(tpl.valid.all())  # one sync per prefill
        if not s.prompt_padded:
            # every row valid, known on the host: the streams carry no mask, so counts and checks
            # downstream are host numbers rather than device reductions
            tpl.valid = None
        s.cur_valid = tpl.valid if tpl.valid is not None else s.cur_slot
        s.start_valid = tpl.valid
        self.session = s
        self.recorder.last.extra["llm_tokens_start"] = L
        return s

    def _is_prefill(self, j, hs, kwargs) -> bool:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if hs.shape[1] <= 1:
            return False
        return cache is None or _cached(cache, j) == 0

    def _layer_pre(self, j, module, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        if self._is_prefill(j, hs, kwargs):
            return self._prefill_layer(j, hs, args, kwargs)
        return self._decode_layer(j, hs, args, kwargs)

    def _prefill_layer(self, j, hs, args, kwargs):
        s = self.session
        name = f"llm.layer.{j}"
        if name in self.by_site:
            info = self.infos[name]
            stream = s.state.with_x(hs, site=name, layer=j, depth=self.depth, info=info, own_layer=info.own_layer,
                                    order="sequence")
            stream, plans = run_stages(stream, self.by_site[name], self.recorder)
            n = hs.shape[1]
            for p in plans:
                # assigned, not `|=` (torch 2.10-2.12 compile `False |= <SymBool>` to invalid code)
                s.ragged = s.ragged or p.valid is not None
                s.sized = s.sized or p.size_scale is not None or bool(p.assign is not None and p.keep.shape[1] < n)
                s.owner = _fold_owner(s.owner, p, n)
                n = p.keep.shape[1]
                s.cur_cols = s.cur_cols.gather(1, p.keep)
                s.cur_valid = s.cur_valid.gather(1, p.keep)
                s.cur_slot = s.cur_slot.gather(1, p.keep)
                if p.valid is not None:
                    s.cur_valid = s.cur_valid & p.valid
                    s.cur_slot = s.cur_slot & p.valid
            if plans:
                s.changed = True
                hs = stream.x
            s.state = stream.state()
        s.cols[j] = s.cur_cols
        s.valid[j] = s.cur_valid
        s.slots[j] = s.cur_slot
        s.ragged_at[j] = s.ragged  # this layer's keys hold padding slots (a ragged plan at or before it)
        s.sizes[j] = s.state.size
        # a device scalar, read back with the statistics; the same for every layer until a plan
        self.recorder.layer(("llm", j), s.reuse("count", (s.cur_valid,), lambda: s.cur_valid.sum(1).float().mean()))
        if not s.changed:
            return None
        s.scatter_pending = True
        idx = s.cur_cols
        # prompt padding is already in the model's mask; only padding slots of ragged plans are new
        ragged = s.cur_slot if s.ragged else None
        kwargs = dict(kwargs)
        if "position_embeddings" in kwargs:
            pe = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = s.reuse("rope", (pe, idx), lambda: gather_rotary(pe, idx))
        if kwargs.get("position_ids") is not None:
            pid = kwargs["position_ids"]
            kwargs["position_ids"] = s.reuse("position_ids", (pid, idx), lambda: gather_positions(pid, idx))
        am = kwargs.get("attention_mask")
        size = s.state.size

        def fix(kind, m):
            return s.reuse(("mask", kind), (m, idx, ragged, size),
                           lambda: self._size_bias(reindex_mask(m, idx, ragged), size, hs))
        kwargs["attention_mask"] = {k: fix(k, v) for k, v in am.items()} if isinstance(am, dict) else fix(None, am)
        if torch.is_grad_enabled() and torch.is_tensor(size) and size.requires_grad and not hs.requires_grad \
                and self._has_sizes(s):
            # A soft key mask is the only input of this layer's attention that needs a gradient
            # (frozen LLM): SDPA's memory-efficient CUDA kernel then skips the logsumexp its mask
            # gradient needs (pytorch/pytorch#148476, "LSE is not correctly aligned"). Tying the
            # hidden states to the sizes by an exact zero makes q/k/v require grad as well.
            hs = hs + (size.sum() * 0).to(hs.dtype)
        if args:
            args = (hs,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = hs
        return args, kwargs

    def _decode_layer(self, j, hs, args, kwargs):
        s = self.session
        if s is None or not s.changed or j not in s.cols:
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        q = hs.shape[1]
        kept = s.valid[j]
        try:
            past = cache.get_seq_length(j) if cache is not None else kept.shape[1]
        except TypeError:
            past = kept.shape[1]
        extra = past + q - kept.shape[1]  # decode tokens since the prefill, this one included
        if extra < 0:
            return None
        am = kwargs.get("attention_mask")
        like = am if torch.is_tensor(am) else None
        # keys: the columns this layer kept at prefill, then every token decoded since (layers
        # that kept the same columns share one)
        kv_valid = s.reuse("kv_valid", (kept, extra), lambda: torch.cat([kept, kept.new_ones(kept.shape[0], extra)], 1))
        window = None
        W = sliding_window_of(cache, j)
        if W is not None:
            # a sliding-window cache holds only the last W - 1 tokens it was given (counted after
            # the reduction), and the unreduced mask lets a query see keys less than W input
            # positions back: both cut the keys here
            index = torch.cat([s.cols[j], torch.arange(s.L0, s.L0 + extra, device=kept.device).expand(
                kept.shape[0], extra)], dim=1)
            n = min(kv_valid.shape[1], W - 1 + q)
            if s.ragged_at.get(j, s.ragged) and n < kv_valid.shape[1]:
                # the padding slots of a ragged plan sit in the window the cache keeps, so a row with
                # fewer survivors would keep fewer of its own tokens than when it runs alone
                raise SiteError(f"decoder layer {j} keeps a sliding window of {W} tokens, and the reduction gave "
                                "the batch's rows different token counts (padding slots the window would keep "
                                "instead of real tokens: adaptive methods such as atp or framefusion, or rows "
                                "holding different numbers of images / crops / tiles, even with fastv or "
                                "uniform); past the window, generate one sample at a time, batch rows with the "
                                "same visual inputs, or reduce before the LLM (projector.out)")
            kv_valid, index = kv_valid[:, -n:], index[:, -n:]
            window = (index, torch.arange(s.L0 + extra - q, s.L0 + extra, device=kept.device), W)
        if like is not None and like.dim() == 2:
            mask = kv_valid.to(like.dtype)
        elif like is None and window is None and not (s.ragged or s.prompt_padded) and not self._has_sizes(s):
            mask = None
        else:
            def make():
                m = mask_from_valid(kv_valid, q, like, causal=True, window=window)
                if self._has_sizes(s):  # the sizes of the keys kept above (the last ones, in a window)
                    sizes = torch.cat([s.sizes[j], s.sizes[j].new_ones(kept.shape[0], extra)], dim=1)
                    m = self._size_bias(m, sizes[:, -kv_valid.shape[1]:], hs)
                return m
            # layers with the same kept keys and sizes share one mask (a window cuts per layer)
            mask = make() if window is not None else s.reuse("decode_mask", (kv_valid, q, like, s.sizes[j]), make)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = mask if not isinstance(am, dict) else {k: mask for k in am}
        return args, kwargs

    def _has_sizes(self, s):
        return self.prop_attn and s.sized

    def _size_bias(self, mask, size, hs):
        """Proportional attention (ToMe's log(size) on the key logits) where sizes differ from 1;
        with fractional sizes this is a differentiable soft key mask."""
        if not self._has_sizes(self.session):
            return mask
        B, K = size.shape
        bias = size.clamp(min=1e-6).log().to(hs.dtype)[:, None, None, :]
        if mask is None:
            mask = mask_from_valid(torch.ones(B, K, dtype=torch.bool, device=hs.device), hs.shape[1],
                                   hs.new_empty(0), causal=True)
        elif mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=hs.dtype, device=mask.device).masked_fill(~mask, torch.finfo(hs.dtype).min)
        elif mask.dim() == 2:
            raise RuntimeError("proportional attention / soft masks need a 4-D mask (sdpa or eager attention), "
                               "not flash-attention's padding mask")
        return mask + bias

    def _lm_post(self, module, args, output):
        s = self.session
        if self.prefilling:  # a cache the model made itself (forward(use_cache=True)) gets the session too
            self.prefilling = False
            self.sessions.bind(output_cache(output), s)
        if s is not None:
            s.reused.clear()  # one forward's gathers (a mask can be large) are not kept for the next
        if s is None or not s.changed or not s.scatter_pending:
            return None
        s.scatter_pending = False
        hs = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        # scatter back to the input length so outputs stay aligned with the input ids; dropped
        # positions read zeros (their logits carry no information); padding slots go to a spare column
        B, L0 = hs.shape[0], s.L0
        full = scatter_to_input(hs, s.cur_cols, s.cur_slot, L0)
        every = getattr(output, "hidden_states", None)
        if isinstance(every, tuple) and every:
            # entry 0 is layer 0's input (after a reduction at llm.layer.0), entry j + 1 layer j's
            # output (the last one normed): each at the length that layer ran, realigned the same way
            last = len(self.layers) - 1
            output.hidden_states = tuple(
                h if h.shape[1] == L0 else
                scatter_to_input(h, s.cols[min(max(e - 1, 0), last)], s.slots[min(max(e - 1, 0), last)], L0)
                for e, h in enumerate(every))
        attn = getattr(output, "attentions", None)
        if isinstance(attn, tuple) and len(attn) == len(self.layers):  # layer j's weights at its own length
            output.attentions = tuple(
                a if not torch.is_tensor(a) or a.dim() != 4 or a.shape[-1] == L0 or j not in s.cols else
                scatter_attention_to_input(a, s.cols[j], s.slots[j], L0) for j, a in enumerate(attn))
        if self.labels is not None and self.labels.shape[:2] == (B, L0):
            kept = torch.zeros(B, L0 + 1, dtype=torch.bool, device=hs.device)
            kept.scatter_(1, s.cur_cols.masked_fill(~s.cur_slot, L0), True)
            # position t's logits predict label t + 1 (the causal-LM loss shift)
            self.labels[:, 1:].masked_fill_(~kept[:, :L0 - 1].to(self.labels.device), -100)
            self.labels = None
        if hasattr(output, "last_hidden_state"):
            output.last_hidden_state = full
            return output
        return (full,) + tuple(output[1:])

    # -- signals ------------------------------------------------------------------------------
    def _on_attention(self, j, sigs, query, key, mask, scaling):
        s = self.session
        if s is None or query.shape[2] <= 1 or query.shape[2] != key.shape[2]:
            return  # decode steps: no signal (reducers here act at prefill)
        st = s.state
        if not any(red.may_act(st.memo) for red in self.consumers[j]):
            return  # every reducer reading this layer's signals is done for this forward
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        # known on the host: without prompt padding or a ragged plan every row is valid, and the
        # signals need no per-layer check of that (a device sync each)
        valid = s.cur_valid if s.prompt_padded or s.ragged else None
        for sig in sigs:
            base, _, arg = sig.partition(":")
            if base == "qk":
                st.signals.put("qk", j, st.pos, (query.detach(), key.detach(), scale, valid))
            elif base == "last_query_attn":
                n = int(arg) if arg else 1
                st.signals.put(sig, j, st.pos, last_query_attention(query.detach(), key.detach(), scale, n=n,
                                                                    key_mask=valid, query_valid=valid))

    # -- stats --------------------------------------------------------------------------------
    def flops(self, record):
        L0 = record.extra.get("llm_input_tokens", record.extra.get("llm_tokens_start"))
        if L0 is None:
            return None
        L_full = record.extra.get("prompt_tokens", L0)  # before any pre-LLM shortening
        reduced = full = 0.0
        for j, layer in enumerate(self.layers):
            macs = linear_macs(layer)
            attn = layer.self_attn
            ad = attn.q_proj.out_features
            n = record.layers.get(("llm", j), [L0])[0]
            reduced += 2.0 * n * macs + attention_flops(n, n, ad) / 2  # causal: half the matrix
            full += 2.0 * L_full * macs + attention_flops(L_full, L_full, ad) / 2
        return reduced, full
