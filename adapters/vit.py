"""Machinery shared by every plain ViT (a stack of pre-norm blocks): timm, open_clip, HF towers.

Sites
  vision.layer.{i}  before block i (so vision.layer.{i+1} is "after block i")
  vision.block.{i}  inside block i, after attention + residual, before the MLP
  vision.out        the final token sequence, before pooling

How `vision.block.{i}` works without copying the block's forward: a block computes
    x1 = x + attn_branch(x);   out = x1 + mlp_branch(x1)
Three hooks on the block's own submodules reduce between the two halves:
  1. a pre-hook on the MLP branch's first module (whose input is exactly x1) runs the stages
     and feeds the reduced x1r to the MLP, so the MLP runs on fewer tokens;
  2. a hook on the MLP branch's last module keeps its output y and hands the block a zero, so
     the block's own residual add `x1 + 0` still has matching shapes;
  3. a hook on the block returns x1r + y: exactly the residual add the block would have done.
With nothing removed the three hooks stay idle, so keep-all is bit-identical by construction.
Attention rows and keys come from hooks on the q/k projections (fused attention stays on);
ToMe's proportional attention is an additive float mask passed through the attention's own
mask argument.
"""
from __future__ import annotations

import inspect
from collections import defaultdict
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from tokenreduce.errors import SiteError
from tokenreduce.flops import block_flops, linear_macs
from tokenreduce.hooks import run_stages
from tokenreduce.signals import cls_attention, head_mean_keys
from tokenreduce.stream import TokenStream

from .base import Adapter, PerThreadState, site


@dataclass
class BlockParts:
    attn: nn.Module      # the attention module (gets the mask / bias kwargs)
    mlp_in: nn.Module    # first module of the MLP branch: its input is x1
    mlp_out: nn.Module   # last module of the MLP branch: its output is added to x1


def read_tokens(output):
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.last_hidden_state


def write_tokens(output, x):
    if torch.is_tensor(output):
        return x
    if isinstance(output, tuple):
        return (x,) + tuple(output[1:])
    if isinstance(output, list):
        return [x] + list(output[1:])
    output.last_hidden_state = x
    return output


def merge_bias(mask, bias, dtype):
    """An existing attention mask (bool: True = attend, or float logits) plus a float bias."""
    bias = bias.to(dtype)
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        mask = torch.zeros_like(mask, dtype=dtype).masked_fill(~mask, float("-inf"))
    return mask + bias


def size_weighted_mean(tokens, size):
    """The mean over dim 1 of (B, N, C) tokens, each counted as the `size` (B, N) tokens it stands
    for: the average pool of merged tokens (ToMe)."""
    w = size[:, :, None].to(tokens.dtype)
    return (tokens * w).sum(1) / w.sum(1)


def padding_bias(mask, bias, dtype):
    """nn.MultiheadAttention's key_padding_mask (bool: True = ignore, or float logits) plus a
    float (B, N) bias (its bool convention is the opposite of merge_bias's)."""
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))
    return merge_bias(mask, bias, dtype)


def _intermediates_of(out) -> list:
    """The intermediate tensors in forward_intermediates' output: timm's (final, [..]) or [..],
    open_clip's {"image_intermediates": [..], ...}"""
    if isinstance(out, dict):
        out = out.get("image_intermediates") or []
    elif isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], (list, tuple)):
        out = out[1]
    if not isinstance(out, (list, tuple)):
        return []
    # return_prefix_tokens=True: each intermediate is (spatial, prefix)
    return [t[0] if isinstance(t, tuple) else t for t in out if torch.is_tensor(t) or isinstance(t, tuple)]


class _Pass:
    """State of one forward through the blocks."""

    def __init__(self):
        self.state: TokenStream | None = None
        self.pending: dict = {}   # block -> [x1r, y]
        self.after: dict = {}     # block -> stream state after the block (for feature-layer selection)
        self.merged = False       # a merge happened: sizes may differ from 1 (host flag, no sync)
        self.n0 = 0
        self.width = 0            # channels of the tokens entering block 0
        self.final: TokenStream | None = None


class ViTAdapter(PerThreadState, Adapter):
    """Generic adapter over a sequence of ViT blocks; family files fill in the parts.

    The state of one forward (PER_FORWARD) is per thread, so two threads may run one reduced
    model at once; unset, it reads None."""

    PER_FORWARD = dict.fromkeys(("_pass", "_grid", "_in_intermediates", "_out_seen", "_final_x", "_frames_pending"))

    #: number of leading protected tokens (CLS, distillation, registers)
    num_prefix: int = 1
    #: index of the CLS token, None when the model has none (SigLIP)
    cls_index: int | None = 0
    #: why signals are missing (shown in errors)
    no_cls_note: str = ""

    # -- family hooks ------------------------------------------------------------------------
    def blocks(self) -> list:
        raise NotImplementedError

    def parts(self, i: int) -> BlockParts:
        raise NotImplementedError

    def patch_module(self) -> nn.Module | None:
        return None

    def out_module(self) -> nn.Module:
        raise NotImplementedError

    def capture_qk(self, i: int, want_q: bool, fn) -> None:
        """Install hooks on block i that call fn(q_cls (B,H,1,D) or None, k (B,H,N,D), scale)."""
        raise NotImplementedError

    def add_attention_bias(self, i: int, bias_fn) -> None:
        """Install a hook that adds bias_fn() (B,1,1,N) float logits to block i's attention."""
        raise NotImplementedError

    def install_extra(self) -> None:
        """Family-specific extras (e.g. size-weighted average pooling)."""

    #: why the model's forward_intermediates, called with these arguments, cannot run this policy
    #: (None: it can)
    def intermediates_refusal(self, arguments: dict) -> str | None:
        return None

    def check_intermediates(self, module) -> None:
        """Wrap `module.forward_intermediates` (timm, open_clip) on this instance: it reshapes
        every intermediate to the patch grid (NCHW, the default) and after a reduction that would
        silently fold tokens into channels, so it raises instead; NLC gives the reduced tokens."""
        original = getattr(module, "forward_intermediates", None)
        if original is None:
            return
        signature = inspect.signature(original)

        def refusal():
            p = self._pass
            return SiteError(
                f"forward_intermediates(output_fmt='NCHW') / get_intermediate_layers(reshape=True) reshape the "
                f"tokens to the patch grid, but the reduction left {p.state.pos.shape[1]} of {p.n0}; use "
                "output_fmt='NLC' (reshape=False) for the reduced tokens, or remove the reduction first")

        def forward_intermediates(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs).arguments
            why = self.intermediates_refusal(arguments)
            if why:
                raise SiteError(why)
            nchw = arguments.get("output_fmt", "NCHW") == "NCHW"
            self._in_intermediates = True
            try:
                out = original(*args, **kwargs)
            except RuntimeError as exc:  # a reshape of a token count that no longer fills the grid
                p = self._pass
                if nchw and p is not None and p.state is not None and p.state.pos.shape[1] != p.n0:
                    raise refusal() from exc
                raise
            finally:
                self._in_intermediates, self._out_seen = False, None
            # a reduced intermediate reshaped to the grid comes back with other channels than the
            # tokens have: only those are refused (intermediates before the reduction are whole grids)
            if nchw and any(t.dim() == 4 and t.shape[1] != self._pass.width for t in _intermediates_of(out)):
                raise refusal()
            return out
        self.hooks.setattr(module, "forward_intermediates", forward_intermediates)

    # -- sites -------------------------------------------------------------------------------
    def sites(self) -> dict:
        depth = len(self.blocks())
        sig = {"keys", "x"} | ({"cls_attn"} if self.cls_index is not None else set())
        note = self.no_cls_note if self.cls_index is None else ""
        out = {}
        for i in range(depth):
            n = f"vision.layer.{i}"
            # before block 0 no attention has run yet: only the tokens themselves are known there
            first = "vision.layer.0 comes before any block, so no attention has run; use vision.layer.1 or later"
            out[n] = site(n, "vision.layer", i, depth, sig if i > 0 else {"x"}, note=note if i else first,
                          own_layer=i - 1 if i else None)
        for i in range(depth):
            n = f"vision.block.{i}"
            out[n] = site(n, "vision.block", i, depth, sig, note=note, own_layer=i)
        out["vision.out"] = site("vision.out", "vision.out", None, depth, sig, note=note, own_layer=depth - 1)
        return out

    # -- install -----------------------------------------------------------------------------
    def install(self, stages, recorder, extra_needs=(), extra_differentiable: bool = False) -> None:
        """extra_needs: [(SiteInfo, Needs)] for stages that run outside this tower but read its
        signals (a VLM adapter's `vision.out`); extra_differentiable: one of them plans with
        gradients (so the signals keep theirs)."""
        self.recorder = recorder
        infos = self.sites()
        self._infos = infos
        self._by_site = defaultdict(list)
        for name, red in stages:
            self._by_site[name].append(red)
        key_layers, cls_layers = set(), set()
        self._prop_attn = self._source = False
        for info, nd in [(infos[n], r.needs(infos[n])) for n, r in stages] + list(extra_needs):
            for sig, layers in nd.signals.items():
                for l in layers:
                    l = info.own_layer if l is None else l
                    if sig == "keys":
                        key_layers.add(l)
                    elif sig == "cls_attn":
                        cls_layers.add(l)
            self._prop_attn |= nd.prop_attn
            self._source |= nd.source
        # signals keep their graph only for a reducer that plans with gradients; otherwise they are
        # stored detached (a stored graph would keep the forward's activations alive after it)
        self._signal_grad = extra_differentiable or any(r.differentiable for _, r in stages)
        self._pass = _Pass()
        self._grid = None
        H = self.hooks
        pm = self.patch_module()
        if pm is not None:
            H.post(pm, self._on_patch)
        blocks = self.blocks()
        for i, blk in enumerate(blocks):
            H.pre(blk, partial(self._block_pre, i))
            H.post(blk, partial(self._block_post, i))
            if f"vision.block.{i}" in self._by_site:
                p = self.parts(i)
                H.pre(p.mlp_in, partial(self._mlp_in, i))
                H.post(p.mlp_out, partial(self._mlp_out, i))
            if i in key_layers or i in cls_layers:
                self.capture_qk(i, i in cls_layers, partial(self._on_qk, i, i in key_layers, i in cls_layers))
            if self._prop_attn:
                self.add_attention_bias(i, self._size_bias)
        H.post(self.out_module(), self._on_out)
        self.install_extra()
        # gradient checkpointing re-runs each block in the backward pass, where the hooks would
        # meet the end-of-forward state: refused at the forward that would checkpoint
        self._checkpointed = [m for m in self.checkpoint_scope().modules()
                              if hasattr(m, "gradient_checkpointing") or hasattr(m, "grad_checkpointing")]

    # -- hooks -------------------------------------------------------------------------------
    def _on_patch(self, module, args, output):
        # a Conv2d patch embedding gives (B, C, H, W); a Conv3d tubelet embedding (B, C, T, H, W)
        if torch.is_tensor(output) and output.dim() == 4:
            self._grid = (1, output.shape[-2], output.shape[-1])
        elif torch.is_tensor(output) and output.dim() == 5:
            self._grid = tuple(output.shape[-3:])

    #: whether a pass through this tower starts a new record (False when a VLM adapter owns it;
    #: then layer records are keyed ("vision", i) so they do not collide with the LLM's)
    owns_record = True

    def layer_key(self, i):
        return i if self.owns_record else ("vision", i)

    def _begin(self, x):
        # transformers checkpoints only in training; timm and open_clip whenever the flag is set
        # (eval mode too), so their flag alone means the blocks re-run in the backward pass
        if torch.is_grad_enabled() and any(
                (m.training and getattr(m, "gradient_checkpointing", False) is True)
                or getattr(m, "grad_checkpointing", False) is True for m in self._checkpointed):
            raise SiteError("gradient checkpointing is on: it re-runs each block in the backward pass, which token "
                            "reduction does not support; turn it off (activation_checkpointing_disable() / "
                            "gradient_checkpointing_disable() in transformers, set_grad_checkpointing(False) in "
                            "timm / open_clip) or run without grad")
        p = self._pass = _Pass()
        if self.owns_record:
            self.recorder.begin()
        grid = self._grid
        n_vis = x.shape[1] - self.num_prefix
        if grid is None or grid[0] * grid[1] * grid[2] != n_vis:
            side = int(round(n_vis ** 0.5))
            grid = (1, side, side) if side * side == n_vis else None
        p.state = TokenStream.start(x, num_prefix=self.num_prefix, grid=grid, track_source=self._source).state()
        p.n0, p.width = x.shape[1], x.shape[-1]
        self.recorder.last.extra["tokens_start" if self.owns_record else "vision_tokens_start"] = p.n0

    def _stream(self, name, x):
        info = self._infos[name]
        st = self._pass.state
        if st is None or st.pos.shape[1] != x.shape[1] or st.pos.shape[0] != x.shape[0]:
            raise RuntimeError(f"tokenreduce: {name} sees {tuple(x.shape[:2])} tokens but the reduction state "
                               f"expects {None if st is None else tuple(st.pos.shape)}; was the model called "
                               "from the middle (not from its first block)?")
        layer = info.index if info.index is not None else info.depth - 1
        return st.with_x(x, site=name, layer=layer, depth=info.depth, info=info, own_layer=info.own_layer,
                         order="prefix")

    def _run(self, name, x):
        stream, plans = run_stages(self._stream(name, x), self._by_site[name], self.recorder)
        if stream.x.shape[1] == 0:  # no class token to fall back on: the blocks / pool would give NaN or crash
            raise SiteError(f"{name}: the plan keeps no token at all; keep at least one (a fraction that rounds "
                            "to 0 keeps none)")
        nv = stream.host_num_visual()  # known on the host for a ViT's stream: no device sync
        if self.pools_patches_only() and not (nv > 0 if nv is not None else bool((stream.num_visual() > 0).all())):
            # the prefix tokens are left, but the model pools the patches alone: NaN or a crash
            raise SiteError(f"{name}: the plan keeps no patch token, and this model pools the patch tokens "
                            "only (not the class / register tokens); keep at least one patch")
        if stream.valid is not None and not bool(stream.valid.all()):
            raise SiteError(f"{name}: the plan keeps different numbers of tokens per sample; inside a ViT "
                            "every sample must keep the same count")
        self._pass.state = stream.state()
        # sizes leave 1 only when a merge folds tokens together (known on the host: fewer slots)
        n = x.shape[1]
        for p in plans:
            # assigned, not `|=`: under torch.compile with symbolic shapes torch 2.10-2.12 write
            # `False |= <SymBool>` into the graph's code, a SyntaxError (pytorch/pytorch#184272)
            if p.size_scale is not None or (p.assign is not None and p.keep.shape[1] < n):
                self._pass.merged = True
            n = p.keep.shape[1]
        return stream.x, len(plans) > 0  # not bool(plans): torch 2.11's dynamo breaks the graph on bool(list)

    def _block_pre(self, i, module, args):
        x = args[0]
        if i == 0:
            self._begin(x)
        out = None
        name = f"vision.layer.{i}"
        if name in self._by_site:
            x, changed = self._run(name, x)
            out = (x,) + tuple(args[1:])
        self.recorder.layer(self.layer_key(i), x.shape[1])
        return out

    def _block_post(self, i, module, args, output):
        pend = self._pass.pending.pop(i, None)
        if pend is not None:
            x1r, y = pend
            output = write_tokens(output, x1r + y)
        x = read_tokens(output)
        self.recorder.last.layers[self.layer_key(i)][1] = x.shape[1]
        self._pass.after[i] = self._pass.state
        return output if pend is not None else None

    def _mlp_in(self, i, module, args):
        x1 = args[0]
        x1r, changed = self._run(f"vision.block.{i}", x1)
        if not changed:
            return None
        self._pass.pending[i] = [x1r, None]
        return (x1r,) + tuple(args[1:])

    def _mlp_out(self, i, module, args, output):
        pend = self._pass.pending.get(i)
        if pend is None or pend[1] is not None:
            return None
        pend[1] = output
        return output.new_zeros(output.shape[0], *([1] * (output.dim() - 1)))

    def _on_qk(self, i, want_keys, want_cls, q_cls, k, scale):
        st = self._pass.state
        sig = st.signals
        if not self._signal_grad:  # plans run under no_grad: nothing needs the graph (see install)
            q_cls, k = (None if q_cls is None else q_cls.detach()), k.detach()
        if want_keys:
            sig.put("keys", i, st.pos, head_mean_keys(k))
        if want_cls:
            bias = self._size_bias()
            if bias is not None and not self._signal_grad:
                bias = bias.detach()
            sig.put("cls_attn", i, st.pos, cls_attention(q_cls, k, scale, bias))

    def sized_pool_keys(self, module, args, kwargs):
        """Pre-hook (with kwargs) for an nn.MultiheadAttention pooling this forward's final tokens
        (SigLIP's head, CoCa's attentional pooler): log(size) on each merged token's key, so the
        pool attends to it as to the tokens it stands for."""
        key = args[1] if len(args) > 1 else kwargs.get("key")
        size = None if key is None else self.merged_sizes(key)
        if size is None:
            return None
        kwargs = dict(kwargs)
        kwargs["key_padding_mask"] = padding_bias(kwargs.get("key_padding_mask"), size.log(), key.dtype)
        return args, kwargs

    def checkpoint_scope(self):
        """The module whose blocks the sites sit in (a whole CLIP model also holds a text tower,
        whose checkpointing is none of our business)."""
        return self.model

    def pools_patches_only(self) -> bool:
        """Whether the model's output pools (averages or takes the max of) the patch tokens without
        the prefix (class / register) tokens, so a plan must leave at least one patch."""
        return False

    def merged_sizes(self, tokens):
        """This forward's final token sizes (B, N) when it merged tokens and `tokens` (B, N, ...)
        have its final token count, else None: a pool over them must weight each token by its
        size (ToMe's reference does so for its average pool)."""
        p = self._pass
        if p is None or not p.merged:
            return None
        # final: the state at vision.out; forward_intermediates (open_clip) runs the blocks without
        # the transformer's forward where vision.out sits: then the state after the last block
        st = p.final if p.final is not None else p.state
        if st is None:
            return None
        size = st.size
        return size if tuple(tokens.shape[:2]) == tuple(size.shape) else None

    def _size_bias(self):
        st = self._pass.state
        if st is None or not self._prop_attn or not self._pass.merged:
            return None
        return st.size.log()[:, None, None, :]

    def _on_out(self, module, args, output):
        x = read_tokens(output)
        changed = False
        if "vision.out" in self._by_site:
            x, changed = self._run("vision.out", x)
        self._pass.final = self._pass.state
        if self.owns_record:  # tokens leaving the encoder, after any vision.out reduction
            self.recorder.last.extra["tokens_out"] = x.shape[1]
        return write_tokens(output, x) if changed else None

    # -- stats -------------------------------------------------------------------------------
    def block_costs(self) -> list:
        if not hasattr(self, "_costs"):
            costs = []
            for i, blk in enumerate(self.blocks()):
                p = self.parts(i)
                am = linear_macs(p.attn)
                costs.append((am, linear_macs(blk) - am, self.attn_dim(i)))
            self._costs = costs
        return self._costs

    def attn_dim(self, i: int) -> int:
        raise NotImplementedError

    def flops(self, record):
        if not record.layers:
            return None
        n0 = record.extra.get("tokens_start" if self.owns_record else "vision_tokens_start")
        reduced = full = 0.0
        for i, (am, mm, ad) in enumerate(self.block_costs()):
            if self.layer_key(i) not in record.layers:
                continue
            n_in, n_out = record.layers[self.layer_key(i)]
            reduced += block_flops(n_in, n_out, am, mm, ad)
            full += block_flops(n0, n0, am, mm, ad)
        return reduced, full
