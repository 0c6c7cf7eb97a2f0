"""ATP-LLaVA: instance- and layer-adaptive token pruning inside the LLM, with Spatial Augmented Pruning."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import PolicyError
from ..registry import register_reducer
from ..signals import attention_rows
from ..stream import Kind, Plan, TokenStream
from .base import Needs, Reducer, SiteInfo, check_choice, check_fraction

#: reference insertion layers of the paper's 32-layer LLaMA (LLaVA-1.5-7B) [3rd-impl]
REFERENCE_LAYERS = (4, 14, 24)
REFERENCE_DEPTH = 32
#: [3rd-impl] budget-loss constants (placeholders until checked against the paper's PDF)
LAMBDA_ATP = 0.05
LAMBDA_TARGET = 0.2
TARGET_FRACTION = 144 / 576
TAU = 10.0
N_FEATURES = 4


def atp_layers(depth: int, reference=REFERENCE_LAYERS, reference_depth: int = REFERENCE_DEPTH) -> list:
    """The reference insertion layers {4, 14, 24} of a 32-layer LLM scaled to `depth` layers:
    round(l * depth / 32), clamped to 1..depth-1 (layer 0 has no attention to score from),
    duplicates removed. atp_layers(32) == [4, 14, 24]; atp_layers(28) == [4, 12, 21]."""
    depth = int(depth)
    if depth < 2:
        raise PolicyError(f"atp needs an LLM with at least 2 layers, got depth={depth}")
    out = sorted({min(depth - 1, max(1, int(math.floor(l * depth / reference_depth + 0.5)))) for l in reference})
    return out


def atp_policy(depth: int, reducer: "ATP | None" = None, **params):
    """A Policy with one ATP reducer (shared, so one threshold module holds every layer's head)
    at the scaled reference layers."""
    from ..policy import Policy, Stage
    red = reducer if reducer is not None else ATP(**params)
    return Policy([Stage(f"llm.layer.{l}", red) for l in atp_layers(depth)])


class ATPThresholds(nn.Module):
    """The learnable part of ATP: per insertion layer, a small MLP from instance statistics to
    the two thresholds. Output (a_r, a_s): θ_r is placed a_r (log-)standard deviations above the
    mean redundancy score, θ_s = sigmoid(logit(spatial_threshold) + a_s). The last linear layer
    starts at zero, so an untrained module reproduces the training-free rule exactly."""

    def __init__(self, hidden: int = 16, n_features: int = N_FEATURES, seed: int = 0):
        super().__init__()
        self.hidden = int(hidden)
        self.n_features = int(n_features)
        self.seed = int(seed)
        self.heads = nn.ModuleDict()

    def ensure(self, layer: int) -> nn.Module:
        key = str(int(layer))
        if key not in self.heads:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1009 + int(layer)) % 2 ** 63)
                head = nn.Sequential(nn.Linear(self.n_features, self.hidden), nn.GELU(), nn.Linear(self.hidden, 2))
            nn.init.zeros_(head[2].weight)
            nn.init.zeros_(head[2].bias)
            ref = next(self.parameters(), None)
            if ref is not None:
                head = head.to(ref.device)
            self.heads[key] = head
        return self.heads[key]

    def layers(self) -> list:
        return sorted(int(k) for k in self.heads)

    def forward(self, layer: int, features: Tensor) -> Tensor:
        return self.ensure(layer)(features)


@register_reducer
@dataclass
class ATP(Reducer):
    """ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models. Ye et al., CVPR 2025,
    arXiv:2412.00447. No official code; see docs/ALGORITHMS.md §2 for what is confirmed.

    An ATP stage sits between two LLM decoder layers (`llm.layer.k`, k >= 1; reference layers
    {4, 14, 24} of a 32-layer LLM, `atp_layers(depth)` scales them, `atp_policy(depth)` builds
    the policy). From the post-RoPE q/k of layer k-1 (the "qk" signal) it scores the surviving
    visual tokens and keeps

        keep = (S_red > θ_r) OR (S_spatial > θ_s)          (every non-visual token is kept)

    with thresholds that differ per instance and per layer.

    Scores (our concrete reading of the paper's prose; the formulas are not public):
    - S_self(v): attention v receives from the *other* visual queries of layer k-1 (head-averaged
      softmax of the model's own causal attention, padding keys excluded, log(size) added where
      sizes differ as the adapter does), averaged over the visual queries that can see v.
      [2nd: "attention a visual token receives from other visual tokens"; the [3rd-impl] mean of
      pre-softmax logits of v as a query is not used.]
    - S_cross(v): the same from the text queries after v (the prompt / question).
    - S_red = (S_self / mean S_self + S_cross / mean S_cross) / 2: "the average of the two" [2nd],
      each first divided by its instance mean so that the two modalities weigh equally (raw
      text->visual weights are much larger than visual->visual ones). S_self only when no text
      query follows the visual tokens.
    - S_spatial(v): dynamic uniform spatial sampling of the *surviving* visual tokens. Each frame
      (or image) is tiled into blocks of stride 2, 4, 8, ... on its token grid (from `stream.grid`,
      else a square grid of the patches per frame, else a 1-D row); in every block the survivor
      nearest the block centre represents it, chosen among the representatives of the finer
      level (so the samplings are nested). S_spatial(v) = 1 - rate of the sparsest sampling
      whose representative v is (rate = blocks / grid cells), 0 for tokens that represent no
      block. S_spatial > θ_s therefore keeps a uniform grid of density about 1 - θ_s even after
      earlier prunes (θ_s = 0.7 ~ a stride-2 grid, the [3rd-impl] R_s = 0.25). The [3rd-impl]
      value 1 - R_s·λ_sample for grid tokens is replaced by this graded score, so that θ_s
      chooses the density.

    Thresholds, two modes (`thresholds=`):
    - "fixed" (training-free; OUR rule, not the paper's, which trains its thresholds): with
      z = standardised log S_red over the instance's visual tokens, θ_r = exp(mean + alpha·std)
      of log S_red (so θ_r moves with every instance and layer), θ_s = `spatial_threshold`.
    - "learned": a small module per insertion layer (`ATPThresholds`, held in `module`, created
      lazily when the stage is installed, saved / loaded with safetensors) maps instance
      statistics (log(1 + n·mean) and log(1 + n·std) of S_self and S_cross) to offsets of the
      two thresholds ([3rd-impl]: θ = sigmoid(Linear(Linear([mean S_self, mean S_cross])))). It
      starts at the fixed rule (zero-initialised last layer).

    Training (`training=True`, or `reducer.train()`): every token is kept and the plan carries
    `size_scale` = soft mask = max(σ(τ·(z - alpha_r)), σ(τ·(S_spatial - θ_s))) with τ = `tau`
    ([3rd-impl] τ = 10; here z is in standard deviations). Needs(prop_attn=True) (declared in
    training only) makes later layers add log(size) to their key logits, so the soft mask is a differentiable key mask
    and gradients reach the threshold module from the next-token loss. At inference the same
    thresholds are hard and the plan prunes (per-sample counts differ: a ragged plan).
    `last` (and `stream.memo["atp"]`) holds the per-stage soft kept counts of the last forward;
    `budget_loss()` turns them into the ATP loss term (see its docstring; every constant there
    is a [3rd-impl] placeholder).

    Defaults (ours; the paper's trained thresholds are not public): alpha = 0 keeps the visual
    tokens whose S_red is above the instance's geometric mean; spatial_threshold = 0.9 keeps a
    stride-4 grid (1/16 of the tokens) on a large token grid (on a 2x2 grid nothing, as no
    sampling there is that sparse).

    Other deviations and notes: the paper trains the ATP modules *with* the LLM; here only the
    threshold heads are trainable (the paper's frozen-LLM variant, reported 2-3 points lower
    [2nd]). The scores need the visual rows of layer k-1's attention, computed from its q/k in
    chunks of `chunk` queries (O(rows·N) per head, the model keeps its fused attention).
    Needs(prop_attn=True) is declared in training only: at inference ATP prunes (every size
    stays 1), and another reducer's merges in the same policy (FrameFusion's, whose sizes never
    reach the attention logits) must not be turned into log(size) biases by ATP's presence.
    Survivors keep their original positions (adapter). Batched; no per-forward state on the
    reducer except `last`, a reference to the last forward's memo entry (per stage: layer,
    kept (B,), n (B,), theta_r (B,), theta_s (B,), alpha_r (B,)).
    """

    name = "atp"
    summary = "keep visual tokens above instance/layer-adaptive redundancy or spatial-sampling thresholds"
    paper = "Ye et al., ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models, CVPR 2025 (arXiv:2412.00447)"
    site_families = ("llm.layer",)
    differentiable = True

    thresholds: str = "fixed"
    alpha: float = 0.0
    spatial_threshold: float = 0.9
    tau: float = TAU
    training: bool = False
    hidden: int = 16
    weights: object = None
    seed: int = 0
    chunk: int = 256
    module: object = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        check_choice(self.name, "thresholds", self.thresholds, ("fixed", "learned"))
        for nm in ("alpha", "tau"):
            v = getattr(self, nm)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise PolicyError(f"{self.name}: {nm} must be a finite number, got {v!r}")
        if self.tau <= 0:
            raise PolicyError(f"{self.name}: tau must be > 0, got {self.tau!r}")
        check_fraction(self.name, "spatial_threshold", self.spatial_threshold, 0.0, 1.0, lo_open=True, hi_open=True)
        if not isinstance(self.training, bool):
            raise PolicyError(f"{self.name}: training must be True or False, got {self.training!r}")
        for nm in ("hidden", "chunk", "seed"):
            v = getattr(self, nm)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if nm == "seed" else 1):
                raise PolicyError(f"{self.name}: {nm} must be an int >= {0 if nm == 'seed' else 1}, got {v!r}")
        if self.weights is not None and not isinstance(self.weights, str):
            raise PolicyError(f"{self.name}: weights must be a path to a .safetensors file or None, got {self.weights!r}")
        if self.weights is not None and self.thresholds != "learned":
            raise PolicyError(f"{self.name}: weights={self.weights!r} needs thresholds='learned' "
                              "(valid thresholds: fixed, learned)")
        if self.module is not None and not isinstance(self.module, ATPThresholds):
            raise PolicyError(f"{self.name}: module must be an ATPThresholds, got {type(self.module).__name__}")
        self.last: dict | None = None

    # -- parameters / modes -------------------------------------------------------------------
    def params(self) -> dict:
        out = super().params()
        out.pop("module", None)
        return out

    def train(self, mode: bool = True) -> "ATP":
        """Soft masks, every token kept (differentiable). Returns self."""
        self.training = bool(mode)
        if self.module is not None:
            self.module.train(mode)
        return self

    def eval(self) -> "ATP":
        return self.train(False)

    def parameters(self):
        """The threshold module's parameters (empty with thresholds='fixed')."""
        return iter(()) if self.module is None else self.module.parameters()

    def threshold_module(self, layers=()) -> ATPThresholds:
        """The learnable thresholds, created on first use (with heads for `layers`)."""
        if self.module is None:
            self.module = ATPThresholds(self.hidden, seed=self.seed)
            self.module.train(self.training)
            if self.weights is not None:
                self.load_thresholds(self.weights)
        for l in layers:
            self.module.ensure(l)
        return self.module

    def save_thresholds(self, path) -> None:
        from safetensors.torch import save_file
        m = self.threshold_module()
        meta = {"hidden": str(m.hidden), "n_features": str(m.n_features), "layers": ",".join(map(str, m.layers())),
                "method": self.name}
        save_file({k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}, str(path), metadata=meta)

    def load_thresholds(self, path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
        if self.module is None:
            self.module = ATPThresholds(int(meta.get("hidden", self.hidden)), seed=self.seed)
            self.module.train(self.training)
        layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("heads.")})
        for l in layers:
            self.module.ensure(l)
        missing, unexpected = self.module.load_state_dict(state, strict=False)
        if unexpected:
            raise PolicyError(f"{self.name}: {path} has unexpected keys {unexpected[:4]}")

    # -- contract -----------------------------------------------------------------------------
    def needs(self, site: SiteInfo) -> Needs:
        if self.thresholds == "learned" and site.index:
            self.threshold_module([site.index])
        return Needs(signals={"qk": (None,)}, prop_attn=self.training)

    def check_site(self, site: SiteInfo) -> None:
        if self.thresholds == "learned" and self.weights is not None and site.index and self.module is None:
            from safetensors import safe_open
            try:
                with safe_open(str(self.weights), "pt") as f:
                    have = sorted({int(k.split(".")[1]) for k in f.keys() if k.startswith("heads.")})
            except (OSError, RuntimeError, ValueError) as exc:
                raise PolicyError(f"{self.name}: cannot read weights {self.weights!r}: {exc}") from None
            if site.index not in have:
                raise PolicyError(f"{self.name}: weights {self.weights!r} hold thresholds for layers "
                                  f"{', '.join(map(str, have)) or '(none)'}; this stage sits at {site.name}")
        super().check_site(site)

    # -- scores -------------------------------------------------------------------------------
    def _qk(self, stream: TokenStream):
        src_pos, (q, k, scale, _) = stream.signals.raw("qk", stream.own_layer)
        pos = stream.pos
        if src_pos.shape != pos.shape or not torch.equal(src_pos, pos):
            B = pos.shape[0]
            table = torch.zeros(B, int(max(src_pos.max(), pos.max())) + 1, dtype=torch.long, device=pos.device)
            table.scatter_(1, src_pos, torch.arange(src_pos.shape[1], device=pos.device).expand(B, -1))
            idx = table.gather(1, pos)
            q = q.gather(2, idx[:, None, :, None].expand(B, q.shape[1], idx.shape[1], q.shape[3]))
            k = k.gather(2, idx[:, None, :, None].expand(B, k.shape[1], idx.shape[1], k.shape[3]))
        return q, k, scale

    def redundancy_scores(self, stream: TokenStream):
        """(S_self, S_cross) of every token (B, N); values at non-visual tokens are meaningless.
        S_cross is None when no text query follows any visual token."""
        q, k, scale = self._qk(stream)
        B, H, N, D = q.shape
        dev = q.device
        valid = stream.valid if stream.valid is not None else torch.ones(B, N, dtype=torch.bool, device=dev)
        vis = stream.visual
        text = (stream.kind == int(Kind.TEXT)) & valid
        size = stream.size.detach().float()
        size_bias = None
        if not bool((size == 1).all()):
            size_bias = size.clamp(min=1e-6).log()[:, None, None, :]
        rows_needed = (vis | text).any(0)
        acc_self = torch.zeros(B, N, device=dev)
        acc_cross = torch.zeros(B, N, device=dev)
        kpos = torch.arange(N, device=dev)
        first_vis = int(torch.nonzero(vis.any(0)).min()) if bool(vis.any()) else N
        for a in range(first_vis, N, self.chunk):
            b_ = min(N, a + self.chunk)
            if not bool(rows_needed[a:b_].any()):
                continue
            qpos = torch.arange(a, b_, device=dev)
            causal = torch.zeros(b_ - a, N, device=dev).masked_fill(kpos[None] > qpos[:, None], float("-inf"))
            bias = causal[None, None]
            if size_bias is not None:
                bias = bias + size_bias
            A = attention_rows(q[:, :, a:b_], k, scale, bias, valid).mean(1)  # (B, R, N)
            A = torch.nan_to_num(A, nan=0.0)
            wv = vis[:, a:b_].float()
            wt = text[:, a:b_].float()
            acc_self += torch.einsum("br,brn->bn", wv, A)
            diag = A[:, torch.arange(b_ - a, device=dev), qpos]  # (B, R): each query on itself
            acc_self[:, a:b_] -= wv * diag
            acc_cross += torch.einsum("br,brn->bn", wt, A)
        rev = lambda m: m.flip(1).cumsum(1).flip(1)
        n_self = (rev(vis.long()) - vis.long()).float()   # visual queries after v
        n_cross = (rev(text.long()) - text.long()).float()  # text queries after v
        s_self = _fill(acc_self / n_self.clamp(min=1), vis & (n_self > 0), vis)
        has_cross = vis & (n_cross > 0)
        s_cross = _fill(acc_cross / n_cross.clamp(min=1), has_cross, vis) if bool(has_cross.any()) else None
        return s_self, s_cross

    @staticmethod
    def spatial_scores(stream: TokenStream, grids=None) -> Tensor:
        """S_spatial (B, N): 1 - rate of the sparsest uniform block sampling of the surviving
        visual tokens that v represents (0 if none). `grids`: per-sample (H, W) token grids."""
        B, N = stream.pos.shape
        dev = stream.pos.device
        vis = stream.visual
        out = torch.zeros(B, N, device=dev)
        patch = stream.patch if stream.patch is not None else (vis.long().cumsum(1) - 1)
        for b in range(B):
            idx = torch.nonzero(vis[b]).flatten()
            if idx.numel() == 0:
                continue
            H, W = grids[b] if grids is not None else _grid_of(stream, b)
            p = patch[b, idx]
            f = stream.frame[b, idx]
            if bool((p < 0).any()):  # no grid bookkeeping: the visual tokens in order, one plane
                p = torch.arange(idx.numel(), device=dev).clamp(max=H * W - 1)
                f = torch.zeros_like(p)
            new = torch.ones_like(p, dtype=torch.bool)
            new[1:] = (f[1:] != f[:-1]) | (p[1:] <= p[:-1])
            plane = new.long().cumsum(0) - 1
            r, c = p // W, p % W
            r = r.clamp(max=H - 1)
            score = torch.zeros(idx.numel(), device=dev)
            cand = torch.ones(idx.numel(), dtype=torch.bool, device=dev)  # level 0: every survivor
            levels = max(1, math.ceil(math.log2(max(H, W)))) if max(H, W) > 1 else 0
            for lv in range(1, levels + 1):
                s = 2 ** lv
                nbr, nbc = -(-H // s), -(-W // s)
                br, bc = r // s, c // s
                block = (plane * nbr + br) * nbc + bc
                # doubled coordinates of each block's centre (edge blocks are clipped to the grid)
                cr2 = br * s + torch.clamp((br + 1) * s, max=H) - 1
                cc2 = bc * s + torch.clamp((bc + 1) * s, max=W) - 1
                d2 = (2 * r - cr2) ** 2 + (2 * c - cc2) ** 2
                big = torch.iinfo(torch.long).max
                val = torch.where(cand, d2 * (N + 1) + idx, torch.full_like(d2, big))
                nb = int(block.max()) + 1
                best = torch.full((nb,), big, dtype=torch.long, device=dev)
                best = best.scatter_reduce(0, block, val, reduce="amin")
                rep = cand & (val == best[block])
                cand = rep  # the next, sparser level picks among these: the samplings are nested
                rate = (nbr * nbc) / float(H * W)
                score = torch.where(rep, torch.clamp(score, min=1.0 - rate), score)
            out[b, idx] = score
        return out

    # -- plan ---------------------------------------------------------------------------------
    def plan(self, stream: TokenStream) -> Plan | None:
        vis = stream.visual
        B, N = vis.shape
        dev = stream.pos.device
        if not bool(vis.any()):
            return None
        rec = stream.memo.get("atp")
        if rec is None:
            rec = {"stages": [], "depth": stream.depth, "n0": None, "grids": None}
            stream.memo["atp"] = rec
        self.last = rec
        size = stream.size
        if rec["n0"] is None:  # visual tokens (in original units) at the first ATP stage of this forward
            rec["n0"] = (size.detach().float() * vis).sum(1)
            rec["grids"] = [_grid_of(stream, b) for b in range(B)]
        s_self, s_cross = self.redundancy_scores(stream)
        s_red = _norm(s_self, vis) if s_cross is None else 0.5 * (_norm(s_self, vis) + _norm(s_cross, vis))
        log_red = s_red.clamp(min=1e-12).log()
        mu, sd = _masked_mean_std(log_red, vis)
        sd = sd.clamp(min=1e-6)
        z = (log_red - mu[:, None]) / sd[:, None]
        s_sp = self.spatial_scores(stream, rec["grids"])

        alpha_r = torch.full((B,), float(self.alpha), device=dev)
        logit_s = torch.full((B,), _logit(self.spatial_threshold), device=dev)
        if self.thresholds == "learned":
            feats = self.features(s_self, s_cross, vis)
            mod = self.threshold_module([stream.layer])
            if next(mod.parameters()).device != dev:
                mod.to(dev)
            off = mod(int(stream.layer), feats)
            alpha_r = alpha_r + off[:, 0]
            logit_s = logit_s + off[:, 1]
        theta_s = torch.sigmoid(logit_s)
        theta_r = torch.exp(mu + alpha_r * sd)  # in units of S_red (mean-normalised scores)

        if self.training:
            soft = torch.maximum(torch.sigmoid(self.tau * (z - alpha_r[:, None])),
                                 torch.sigmoid(self.tau * (s_sp - theta_s[:, None])))
            mask = torch.where(vis, soft, torch.ones_like(soft))
            kept = (size * mask * vis).sum(1)
            rec["stages"].append({"layer": int(stream.layer), "kept": kept, "n": vis.sum(1),
                                  "theta_r": theta_r, "theta_s": theta_s, "alpha_r": alpha_r, "soft": True})
            return Plan(keep=torch.arange(N, device=dev).expand(B, N), size_scale=mask)
        keep_vis = vis & ((z > alpha_r[:, None]) | (s_sp > theta_s[:, None]))
        kept = (size * keep_vis).sum(1)
        rec["stages"].append({"layer": int(stream.layer), "kept": kept.detach(), "n": vis.sum(1),
                              "theta_r": theta_r.detach(), "theta_s": theta_s.detach(),
                              "alpha_r": alpha_r.detach(), "soft": False})
        if bool((keep_vis == vis).all()):
            return None
        return Plan.from_mask(~vis | keep_vis)

    def features(self, s_self: Tensor, s_cross: Tensor | None, vis: Tensor) -> Tensor:
        """(B, 4) instance statistics for the threshold module: log(1 + n·mean), log(1 + n·std)
        of S_self and S_cross over the visual tokens (zeros for S_cross when there is none)."""
        n = vis.sum(1).float().clamp(min=1)
        out = []
        for s in (s_self, s_cross):
            if s is None:
                out += [torch.zeros_like(n), torch.zeros_like(n)]
                continue
            m, sd = _masked_mean_std(s.float(), vis)
            out += [torch.log1p(n * m.clamp(min=0)), torch.log1p(n * sd)]
        return torch.stack(out, 1).detach()

    # -- the ATP loss ---------------------------------------------------------------------------
    def budget_loss(self, lambda_atp: float = LAMBDA_ATP, lambda_target: float = LAMBDA_TARGET,
                    target: float = TARGET_FRACTION, record: dict | None = None) -> Tensor:
        """The budget terms of the ATP loss for the last forward (add the next-token loss):

            λ_atp · Σ_stages (kept_l / n) · l / depth  +  λ_target · |avg_kept / n − target|

        kept_l: soft kept visual tokens after the stage at layer l (cumulative over earlier
        stages; original-token units); n: visual tokens at the first ATP stage; avg_kept: kept
        visual tokens averaged over all `depth` layers (n before the first stage). Mean over the
        batch. [3rd-impl] constants: λ_atp = 0.05, λ_target = 0.2, target 144/576 = 0.25; the
        paper's Σ (kept/576)·layer_idx is divided by depth here so λ_atp does not scale with the
        model's depth; "avg kept" as the per-layer average is our reading."""
        rec = record if record is not None else self.last
        if rec is None or not rec["stages"]:
            raise RuntimeError("atp.budget_loss(): no ATP stage ran in the last forward")
        depth = int(rec["depth"])
        n0 = rec["n0"].clamp(min=1e-6)
        stages = sorted(rec["stages"], key=lambda s: s["layer"])
        term = 0.0
        frac_sum = 0.0
        prev_layer, prev_frac = 0, torch.ones_like(n0)
        for st in stages:
            frac = st["kept"] / n0
            term = term + frac * (st["layer"] / depth)
            frac_sum = frac_sum + prev_frac * (st["layer"] - prev_layer)
            prev_layer, prev_frac = st["layer"], frac
        frac_sum = frac_sum + prev_frac * (depth - prev_layer)
        avg = frac_sum / depth
        loss = lambda_atp * term + lambda_target * (avg - target).abs()
        return loss.mean()

    def kept_fraction(self, record: dict | None = None) -> Tensor:
        """(B,) kept visual fraction after the last ATP stage of the last forward (soft in training)."""
        rec = record if record is not None else self.last
        if rec is None or not rec["stages"]:
            raise RuntimeError("atp.kept_fraction(): no ATP stage ran in the last forward")
        last = max(rec["stages"], key=lambda s: s["layer"])
        return last["kept"] / rec["n0"].clamp(min=1e-6)


# -- helpers ----------------------------------------------------------------------------------
def _masked_mean_std(x: Tensor, m: Tensor):
    w = m.float()
    n = w.sum(1).clamp(min=1)
    mean = (x * w).sum(1) / n
    var = (((x - mean[:, None]) ** 2) * w).sum(1) / n
    return mean, var.clamp(min=0).sqrt()


def _norm(s: Tensor, vis: Tensor) -> Tensor:
    mean, _ = _masked_mean_std(s, vis)
    return s / mean.clamp(min=1e-12)[:, None]


def _fill(s: Tensor, defined: Tensor, vis: Tensor) -> Tensor:
    """Tokens with no query to score them (e.g. the last visual token for S_self) get the mean."""
    mean, _ = _masked_mean_std(s, defined)
    return torch.where(defined, s, mean[:, None].expand_as(s)).masked_fill(~vis, 0.0)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _grid_of(stream: TokenStream, b: int) -> tuple:
    """(H, W) of one frame's token grid for sample b: stream.grid, else a square grid of the
    patches per frame, else one row."""
    grid = stream.grid_of(b)
    if grid is not None:
        return int(grid[1]), int(grid[2])
    vis = stream.visual[b]
    if stream.patch is None or not bool(vis.any()) or bool((stream.patch[b][vis] < 0).any()):
        n = int(vis.sum())
        side = int(round(math.sqrt(n)))
        return (side, side) if side * side == n and n else (1, max(n, 1))
    P = int(stream.patch[b][vis].max()) + 1
    side = int(round(math.sqrt(P)))
    return (side, side) if side * side == P else (1, P)
