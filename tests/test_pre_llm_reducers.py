"""Pre-LLM reducers: VisionZip and PruMerge+ at `vision.out`, DyCoke's TTM at `projector.out`.

Unit level: hand-built TokenStreams with known signals (counts, the contextual-token formula,
the IQR rule, the lowest-similarity rule). End to end: the tiny LLaVA-1.5 (CLIP tower) and the
tiny LLaVA-OneVision / LLaVA-NeXT-Video video models from vlm_models.py."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import tokenreduce as tr  # noqa: E402
from tokenreduce.errors import PolicyError, SiteError  # noqa: E402
from tokenreduce.reducers.base import SiteInfo  # noqa: E402
from tokenreduce.reducers.dycoke_ttm import DyCokeTTM  # noqa: E402
from tokenreduce.reducers.prumerge_plus import PruMergePlus, iqr_outliers, uniform_extras  # noqa: E402
from tokenreduce.reducers.visionzip import VisionZip  # noqa: E402
from tokenreduce.stream import Kind, TokenStream, apply_plan  # noqa: E402

transformers = pytest.importorskip("transformers")
import vlm_models as V  # noqa: E402

NEW = 4


# -- hand-built streams -------------------------------------------------------------------------
def _tower_site(depth=24, own=22):
    return SiteInfo(name="vision.out", family="vision.out", depth=depth, own_layer=own, max_layer=depth - 1,
                    signals=frozenset({"cls_attn", "keys", "x"}))


def _vision_stream(x, attn, keys, layer, num_prefix=0, site=None):
    """A vision.out stream over x (B, N, C) with cls_attn / keys (B, N[, D]) captured at `layer`."""
    site = site or _tower_site()
    N = x.shape[1]
    side = int(round((N - num_prefix) ** 0.5))
    st = TokenStream.start(x, num_prefix=num_prefix, grid=(1, side, side) if side * side == N - num_prefix else None)
    st.signals.put("cls_attn", layer, st.pos, attn)
    st.signals.put("keys", layer, st.pos, keys)
    return st.with_x(x, site="vision.out", info=site, own_layer=site.own_layer, depth=site.depth, order="prefix")


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _distinct_attn(B, N, seed=0):
    """Strictly distinct positive attention values (no ties)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g).float() + 1.0 for _ in range(B)]) / (N * N)


def _visionzip_reference(x, attn, keys, dominant, contextual):
    """VisionZip's contextual merging written out as the reference does it (mask + one-hot),
    for a stream without CLS: dominant = top-`dominant`, in sequence order."""
    B, N, C = x.shape
    top = attn.topk(dominant, dim=1).indices
    mask = torch.ones(B, N, dtype=torch.bool).scatter_(1, top, False)
    dom = x.masked_select(~mask[..., None]).view(B, dominant, C)
    R = N - dominant
    metric = keys[mask].view(B, R, -1)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    hidden = x.masked_select(mask[..., None]).view(B, R, C)
    step = max(1, R // contextual)
    t_idx = torch.arange(0, R, step)[:contextual]
    is_t = torch.isin(torch.arange(R), t_idx)
    sim = torch.bmm(metric[:, ~is_t], metric[:, t_idx].transpose(1, 2))
    onehot = torch.zeros(B, int((~is_t).sum()), contextual).scatter_(2, sim.argmax(2, keepdim=True), 1.0)
    counts = onehot.sum(1).clamp(min=1)[..., None]
    ctx = hidden[:, t_idx] + torch.bmm(onehot.transpose(1, 2), hidden[:, ~is_t]) / counts
    return torch.cat([dom, ctx], 1), counts[..., 0]


# -- VisionZip ----------------------------------------------------------------------------------
def test_visionzip_keeps_dominant_plus_contextual_and_matches_the_reference_formula():
    B, N, C, D = 2, 36, 8, 4
    x, keys, attn = _rand(B, N, C, seed=1), _rand(B, N, D, seed=2), _distinct_attn(B, N)
    red = VisionZip(dominant=6, contextual=4)
    st = _vision_stream(x, attn, keys, layer=22)
    plan = red.plan(st)
    out, _ = apply_plan(st, plan)
    assert out.num_tokens == 10 and plan.valid is None
    expected, counts = _visionzip_reference(x, attn, keys, 6, 4)
    # contextual token = target + mean of its assigned tokens (not a mean including the target)
    assert torch.allclose(out.x, expected, atol=1e-6)
    # dominant = the top-6 attention tokens, in sequence order; sizes summed for the contextual ones
    top = attn.topk(6, dim=1).indices.sort(1).values
    assert torch.equal(out.pos[:, :6], top)
    assert torch.equal(out.size[:, :6], torch.ones(B, 6))
    assert torch.equal(out.size[:, 6:], counts + 1)
    assert float(out.size.sum()) == B * N


def test_visionzip_counts_cls_as_a_dominant_token_and_keeps_it_first():
    B, N, C = 2, 1 + 25, 8
    x, keys = _rand(B, N, C, seed=3), _rand(B, N, 4, seed=4)
    attn = _distinct_attn(B, N, seed=5)
    attn[:, 0] = 1.0                                  # the CLS column never competes
    st = _vision_stream(x, attn, keys, layer=22, num_prefix=1)
    out, _ = apply_plan(st, VisionZip(dominant=5, contextual=3).plan(st))
    assert out.num_tokens == 5 + 3                    # CLS + 4 patches + 3 contextual
    assert torch.equal(out.pos[:, 0], torch.zeros(B, dtype=torch.long))
    assert int(out.kind[:, 0].eq(int(Kind.PROTECTED)).sum()) == B
    top = (attn[:, 1:].topk(4, dim=1).indices + 1).sort(1).values
    assert torch.equal(out.pos[:, 1:5], top)
    assert torch.equal(out.x[:, 0], x[:, 0])          # the CLS feature passes unchanged


def test_visionzip_keep_is_split_in_the_reference_ratio():
    assert [VisionZip(keep=k).split(576) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert VisionZip(keep=0.25).split(256) == (54, 10)
    assert VisionZip().split(576) == (54, 10)
    assert tr.make_reducer("visionzip", {"keep": 64}).spec() == "visionzip(keep=64)"


def test_visionzip_reads_the_feature_layer_by_default():
    red = VisionZip()
    assert red.needs(_tower_site(24, 22)).signals == {"cls_attn": (22,), "keys": (22,)}
    assert VisionZip(layer=-3).needs(_tower_site(24, 22)).signals["keys"] == (21,)
    assert PruMergePlus().needs(_tower_site(24, 22)).signals == {"cls_attn": (23,), "keys": (23,)}


# -- PruMerge+ ----------------------------------------------------------------------------------
def _spiky_attn(N, spikes, seed=0):
    a = 1.0 + 0.2 * torch.randperm(N, generator=torch.Generator().manual_seed(seed)).float() / N
    for j, v in spikes.items():
        a[j] = v
    return a


def test_iqr_rule_matches_numpy():
    a = _spiky_attn(64, {10: 5.0, 20: 4.0, 30: 3.0})
    q1, q3 = np.percentile(a.numpy(), 25), np.percentile(a.numpy(), 75)
    assert iqr_outliers(a) == int((a.numpy() > q3 + 1.5 * (q3 - q1)).sum()) == 3


def test_prumerge_plus_counts_order_and_merge():
    N, C, D, knn = 64, 6, 5, 4
    a0 = _spiky_attn(N, {10: 5.0, 20: 4.0, 30: 3.0}, seed=0)
    a1 = _spiky_attn(N, {7: 5.0, 20: 4.0}, seed=1)
    attn = torch.stack([a0, a1])
    x, keys = _rand(2, N, C, seed=6), _rand(2, N, D, seed=7)
    red = PruMergePlus(knn=knn)
    st = _vision_stream(x, attn, keys, layer=23)
    plan = red.plan(st)
    out, _ = apply_plan(st, plan)
    # sample 0: 3 outliers; ratio 3/64 -> int(1/ratio)=21 -> stride 7 over arange(0, 63)
    extras0 = [0, 7, 14, 21, 28, 35, 42, 49, 56]
    # sample 1: 2 outliers; int(1/(2/64))=32 -> stride 10: 0, 10, ..., 60 minus the kept 20
    extras1 = [0, 10, 30, 40, 50, 60]
    assert uniform_extras(N, 3, torch.tensor([10, 20, 30])).tolist() == extras0
    counts = out.valid.sum(1).tolist()
    assert counts == [3 + 9, 2 + 6]                   # per-sample count -> a ragged plan
    assert out.pos[0, :12].tolist() == [10, 20, 30] + extras0      # top by attention, then extras
    assert out.pos[1, :8].tolist() == [7, 20] + extras1
    # every pruned token folds (weight = its attention, a SUM) into the most key-similar kept
    # token that has it among its knn nearest; tokens in nobody's neighbourhood are dropped
    for b in range(2):
        kept = out.pos[b, :counts[b]].tolist()
        m = torch.nn.functional.normalize(keys[b], dim=-1)
        sim = m @ m.T
        sim.fill_diagonal_(float("-inf"))
        near = {i: set(sim[i].topk(knn).indices.tolist()) for i in kept}
        expected = {i: x[b, i].clone() for i in kept}
        covered = 0
        for j in set(range(N)) - set(kept):
            cand = [i for i in kept if j in near[i]]
            if cand:
                best = max(cand, key=lambda i: float(sim[i, j]))
                expected[best] += attn[b, j] * x[b, j]
                covered += 1
        got = out.x[b, :counts[b]]
        assert torch.allclose(got, torch.stack([expected[i] for i in kept]), atol=1e-5)
        assert float(out.size[b, :counts[b]].sum()) == len(kept) + covered
        assert covered < N - len(kept)                # some tokens were in no neighbourhood


def test_prumerge_plain_and_no_outlier():
    N = 49
    a = _spiky_attn(N, {3: 9.0})
    st = _vision_stream(_rand(1, N, 4), a[None], _rand(1, N, 3), layer=23)
    out, _ = apply_plan(st, PruMergePlus(plus=False).plan(st))
    assert out.pos.tolist() == [[3]]
    flat = torch.linspace(1.0, 1.1, N)[None]           # no outlier: the top token + the extras
    st = _vision_stream(_rand(1, N, 4), flat, _rand(1, N, 3), layer=23)
    out, _ = apply_plan(st, PruMergePlus().plan(st))
    assert out.pos[0].tolist() == [N - 1] + list(range(0, N - 1, 16))


# -- DyCoke TTM ---------------------------------------------------------------------------------
def _video_stream(frames, newline=True):
    """A projector.out stream over frames (T, P, C) of one video (+ a trailing newline token)."""
    T, P, C = frames.shape
    side = int(round(P ** 0.5))
    x = frames.reshape(1, T * P, C)
    if newline:
        x = torch.cat([x, torch.ones(1, 1, C)], 1)
    N = x.shape[1]
    kind = torch.full((1, N), int(Kind.VISUAL))
    frame = torch.full((1, N), -1)
    frame[0, :T * P] = torch.arange(T).repeat_interleave(P)
    if newline:
        kind[0, -1] = int(Kind.PROTECTED)
    st = TokenStream.start(x, kind=kind, frame=frame, grid=(T, side, side), order="sequence")
    return st.with_x(x, site="projector.out")


def _changed(base, where, seed):
    f = base + 1e-3 * _rand(*base.shape, seed=seed)
    f[where] = _rand(len(where), base.shape[-1], seed=seed + 100)
    return f


def test_dycoke_keeps_the_lowest_similarity_tokens_per_window():
    P, C = 16, 8
    frames = []
    for w in range(2):                                  # two windows of 4 frames
        f0 = _rand(P, C, seed=10 + w)
        f1 = _changed(f0, [2, 7, 11], 20 + w)           # vs frame 0
        f2 = _changed(f0, [0, 5, 9], 30 + w)            # vs frame 0
        f3 = _changed(f2, [1, 3, 15], 40 + w)           # vs frame 2 (NOT frame 0)
        frames += [f0, f1, f2, f3]
    st = _video_stream(torch.stack(frames))
    red = DyCokeTTM(k=0.8)                              # int(0.2 * 16) = 3 kept per pruned frame
    assert red.kept_per_frame(P) == 3
    plan = red.plan(st)
    out, _ = apply_plan(st, plan)
    assert out.num_tokens == 2 * (16 + 3 + 3 + 3) + 1
    kept = {f: out.patch[0, out.frame[0] == f].tolist() for f in range(8)}
    for w in (0, 4):
        assert kept[w] == list(range(16))
        assert kept[w + 1] == [2, 7, 11] and kept[w + 2] == [0, 5, 9] and kept[w + 3] == [1, 3, 15]
    assert int(out.kind[0, -1]) == int(Kind.PROTECTED)   # the newline survives
    assert torch.equal(out.x[0], st.x[0, out.pos[0]])   # nothing averaged: a pure gather
    assert bool((out.pos[0].diff() > 0).all())          # sequence order


def test_dycoke_counts_defaults_and_partial_window():
    assert DyCokeTTM().kept_per_frame(196) == 58         # int(0.3 * 196), README K=0.7
    assert DyCokeTTM(ratio=0.3).kept_per_frame(196) == int(0.7 * 196)
    st = _video_stream(_rand(6, 16, 4, seed=1), newline=False)
    out, _ = apply_plan(st, DyCokeTTM(k=0.75).plan(st))   # 4 per pruned frame
    assert out.num_tokens == (16 + 3 * 4) + (16 + 4)      # a trailing window of 2 frames


def test_dycoke_refuses_a_stream_without_frames():
    x = _rand(1, 16, 4)
    image = TokenStream.start(x).with_x(x, site="projector.out")
    with pytest.raises(SiteError, match="dycoke_ttm .* no frame layout .*on_image='keep'"):
        DyCokeTTM().plan(image)
    one = TokenStream.start(x, grid=(1, 4, 4)).with_x(x, site="projector.out")
    with pytest.raises(SiteError, match="a single frame"):
        DyCokeTTM().plan(one)
    assert DyCokeTTM(on_image="keep").plan(image) is None


# -- parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method,params,msg", [
    ("visionzip", {"dominant": -1}, "dominant must be an int >= 0"),
    ("visionzip", {"keep": 64, "dominant": 50}, "either keep .* or dominant / contextual"),
    ("visionzip", {"keep": 1.5}, r"keep=1.5 as a fraction must lie in \(0, 1\]"),
    ("visionzip", {"layer": "x"}, "layer must be an int"),
    ("prumerge_plus", {"knn": -2}, "knn must be an int >= 0"),
    ("prumerge_plus", {"whisker": "wide"}, "whisker must be a number >= 0"),
    ("dycoke_ttm", {"k": 1.5}, r"k must be a number in \[0.0, 1.0\]"),
    ("dycoke_ttm", {"k": 0.5, "ratio": 0.6}, "give one"),
    ("dycoke_ttm", {"on_image": "skip"}, "choose one of: error, keep"),
])
def test_bad_parameters_name_the_valid_choices(method, params, msg):
    with pytest.raises(PolicyError, match=msg):
        tr.make_reducer(method, params)


# -- end to end ---------------------------------------------------------------------------------
def _generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)


def _same_generation(batched, b, single, tol=1e-4):
    for t in range(NEW):
        sb, s1 = batched.scores[t][b], single.scores[t][0]
        assert torch.allclose(sb, s1, atol=tol), f"step {t}: scores differ by {(sb - s1).abs().max():.2e}"
    assert torch.equal(batched.sequences[b, -NEW:], single.sequences[0, -NEW:])


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def llava(request):
    return V.llava(request.param)


def test_visionzip_on_llava15(llava):
    case = llava
    with torch.no_grad():
        base = case.model(**case.batch).logits
    with tr.reduce(case.model, "vision.out=visionzip(dominant=5, contextual=3)") as h:
        with torch.no_grad():
            a = case.model(**case.batch).logits
            b = case.model(**case.batch).logits
        assert h.stats["sites"]["vision.out"]["tokens_out"] == 8
        kept = h.trace["vision.out"]
        assert kept["pos"].shape == (2, 8) and torch.equal(kept["size"].sum(1), torch.full((2,), 16.0))
        assert h.stats["llm_input_tokens"] == float(case.batch["attention_mask"].sum(1).float().mean()) - 8
        g = _generate(case.model, case.batch)
        singles = [_generate(case.model, s) for s in case.singles]
    assert torch.equal(a, b)                                          # deterministic
    assert a.shape == base.shape and not torch.equal(a, base)
    for i, s in enumerate(singles):
        _same_generation(g, i, s)
    with torch.no_grad():
        assert torch.equal(case.model(**case.batch).logits, base)      # removed


def test_prumerge_plus_on_llava15(llava):
    case = llava
    with tr.reduce(case.model, "vision.out=prumerge_plus") as h:
        with torch.no_grad():
            a = case.model(**case.batch).logits
            b = case.model(**case.batch).logits
        st = h.stats
        kept = h.trace["vision.out"]
        g = _generate(case.model, case.batch)
    assert torch.equal(a, b)
    n = kept["valid"].sum(1) if kept["valid"] is not None else torch.full((2,), kept["pos"].shape[1])
    assert st["sites"]["vision.out"]["tokens_out"] == float(n.float().mean()) < 16
    assert g.sequences.shape[1] == case.batch["input_ids"].shape[1] + NEW
    # a single sample is never ragged: its prompt shrinks by exactly the pruned tokens
    with tr.reduce(case.model, "vision.out=prumerge_plus") as h:
        g1 = _generate(case.model, case.singles[0])
        n1 = h.trace["vision.out"]["pos"].shape[1]
        assert h.stats["llm_input_tokens"] == case.singles[0]["input_ids"].shape[1] - (16 - n1)
    assert g1.sequences.shape[1] == case.singles[0]["input_ids"].shape[1] + NEW


def test_prumerge_plus_ragged_batch_matches_single():
    case = V.llava("sdpa")
    with tr.reduce(case.model, "vision.out=prumerge_plus") as h:
        g = _generate(case.model, case.batch)
        n = h.trace["vision.out"]["valid"].sum(1)
        L = case.batch["attention_mask"].sum(1)
        assert h.stats["llm_input_tokens"] == float((L - 16 + n).float().mean())
        singles = [_generate(case.model, s) for s in case.singles]
    for i, s in enumerate(singles):
        _same_generation(g, i, s)


@pytest.mark.parametrize("build", [V.llava_onevision, V.llava_next_video], ids=["onevision", "next_video"])
def test_dycoke_on_video_models(build):
    case = build("sdpa")
    T = case.batch["pixel_values_videos"].shape[1]
    with tr.reduce(case.model, "projector.out=dycoke_ttm") as h:
        with torch.no_grad():
            a = case.model(**case.batch).logits
            b = case.model(**case.batch).logits
        kept = h.trace["projector.out"]
        g = _generate(case.model, case.batch)
        singles = [_generate(case.model, s) for s in case.singles]
    newline = case.visual - (case.visual // T) * T       # LLaVA-OneVision: 1 trailing newline token
    P = (case.visual - newline) // T
    per_window = P + 3 * int(0.3 * P)                     # frame 0 whole + 3 pruned frames
    assert kept["pos"].shape == (2, per_window + newline)
    assert torch.equal(a, b)
    for i, s in enumerate(singles):
        _same_generation(g, i, s)


def test_dycoke_on_an_image_fails_clearly():
    case = V.llava("sdpa")
    with tr.reduce(case.model, "projector.out=dycoke_ttm"), pytest.raises(SiteError, match="a single frame"):
        with torch.no_grad():
            case.model(**case.singles[0])


# -- towers: plain ViTs and SigLIP ----------------------------------------------------------------
def _tower(kind):
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                  image_size=32, patch_size=8)
    if kind == "siglip":
        return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common)).eval()
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common)).eval()


@pytest.mark.parametrize("spec", ["vision.out=visionzip(dominant=6, contextual=4)", "vision.out=prumerge_plus"])
def test_cls_methods_refuse_siglip_at_reduce_time(spec):
    model = _tower("siglip")
    with pytest.raises(SiteError, match=r"needs the signal 'cls_attn'.*SigLIP has no \[CLS\] token"):
        tr.reduce(model, spec)
    assert "_tokenreduce_handle" not in model.__dict__


def test_on_a_plain_clip_tower():
    model = _tower("clip")
    x = _rand(2, 3, 32, 32, seed=9)
    with tr.reduce(model, "vision.out=visionzip(dominant=6, contextual=4)") as h, torch.no_grad():
        out = model(pixel_values=x).last_hidden_state
        kept = h.trace["vision.out"]["pos"]
    assert out.shape[1] == 10 and torch.equal(kept[:, 0], torch.zeros(2, dtype=torch.long))  # CLS first
    with tr.reduce(model, "vision.out=prumerge_plus") as h, torch.no_grad():
        out = model(pixel_values=x[:1]).last_hidden_state
    assert 1 < out.shape[1] < 17 and h.stats["sites"]["vision.out"]["tokens_out"] == out.shape[1]


def test_wrong_sites_are_refused():
    model = _tower("clip")
    with pytest.raises(SiteError, match="visionzip cannot run at site 'vision.block.1'; it runs at: vision.out"):
        tr.reduce(model, "vision.block.1=visionzip")
    with pytest.raises(SiteError, match="valid layers"):
        tr.reduce(model, "vision.out=prumerge_plus(layer=-7)")
    case = V.llava_onevision("sdpa")
    with pytest.raises(SiteError, match="dycoke_ttm cannot run at site 'llm.layer.1'; it runs at: projector.out"):
        tr.reduce(case.model, "llm.layer.1=dycoke_ttm")


# -- budgets in batches whose samples carry different numbers of visual tokens -------------------
def _llm_stream(kind):
    B, N = kind.shape
    x = _rand(B, N, 8)
    site = SiteInfo(name="llm.layer.2", family="llm.layer", index=2, depth=4, own_layer=1,
                    signals=frozenset({"cls_attn", "x"}))
    st = TokenStream.start(x, kind=kind, order="sequence")
    st.signals.put("cls_attn", 1, st.pos, _rand(B, N, seed=1).softmax(-1))
    return st.with_x(x, site=site.name, info=site, own_layer=1, depth=4, layer=2)


def _kept_visual(reducer, kind):
    st = _llm_stream(kind)
    plan = reducer.plan(st)
    if plan is None:
        return st.num_visual().tolist()
    out, _ = apply_plan(st, plan)
    vis = out.visual if out.valid is None else out.visual & out.valid
    return vis.sum(1).tolist()


@pytest.mark.parametrize("spec", ["random(keep=0.5)", "random(keep=0.5, shared=True)", "uniform(keep=0.5)",
                                  "vtc_cls(keep=0.5, layers=[1])", "uniform(keep=3)"])
def test_fractional_budgets_are_per_sample(spec):
    """keep=0.5 is half of each sample's own visual tokens (it was half of the batch's largest),
    so a sample keeps the same count alone as in a batch; a text-only sample keeps its text"""
    from tokenreduce.policy import parse_call
    red = parse_call(spec)
    kind = torch.full((3, 14), int(Kind.TEXT))
    kind[0, 2:12] = int(Kind.VISUAL)   # 10 visual tokens
    kind[1, 2:6] = int(Kind.VISUAL)    # 4
    #      sample 2: text only
    batch = _kept_visual(red, kind)
    alone = [_kept_visual(red, kind[b:b + 1])[0] for b in range(3)]
    want = [3, 3, 0] if spec.endswith("keep=3)") else [5, 2, 0]
    assert batch == alone == want


def test_prumerge_plus_row_keeping_every_token_matches_its_run_alone():
    """LLaVA-1.5 after ToMe in block 0 (13 patches): one image keeps all 13 (IQR outliers + uniform
    extras cover them). Alone there is no plan and the tokens stay in sequence order; in a batch
    with an image that prunes, that row was emitted in [outliers, extras] order (logits off by 0.065)."""
    m = V.llava("sdpa").model
    pix = torch.cat([torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(100 + i)) for i in range(2)])
    row = [5, 6, 7] + [V.IMG] * 16 + [8, 9, 10]
    batch = dict(input_ids=torch.tensor([row, row]), attention_mask=torch.ones(2, len(row), dtype=torch.long),
                 pixel_values=pix)
    with torch.no_grad(), tr.reduce(m, "vision.block.0=tome(r=3); vision.out=prumerge_plus") as h:
        both = m(**batch).logits[:, -1]
        kept = h.stats["sites"]["vision.out"]
        alone = [m(**{k: v[b:b + 1] for k, v in batch.items()}).logits[0, -1] for b in range(2)]
    assert kept["tokens_in"] == 13 and kept["tokens_out"] < 13  # one row prunes
    for b in range(2):
        assert torch.allclose(both[b], alone[b], atol=1e-5), b


@pytest.mark.parametrize("grid, prefix, suffix, keep", [
    ((1, 4, 4), 1, 0, 0.5), ((1, 14, 14), 1, 0, 0.3), ((1, 5, 7), 5, 0, 11),    # ViTs: CLS, registers
    ((8, 2, 2), 0, 1, 0.3), ((4, 3, 3), 0, 1, 13), ((3, 4, 5), 2, 3, 0.7),     # frames + newline / text
    ((2, 3, 3), 0, 0, 18), ((2, 3, 3), 0, 0, 1)])
def test_uniform_on_whole_frames_picks_what_the_per_frame_lattice_picks(grid, prefix, suffix, keep, monkeypatch):
    """Every frame whole: uniform's plan is a (frame, patch) table lookup with a count known on
    the host; it keeps exactly the tokens the per-frame path (which reads indices back) keeps,
    shares of k % T frames included, with the protected / text tokens around the frames."""
    from tokenreduce.reducers import uniform as U
    T, H, W = grid
    n_vis = T * H * W
    B, N = 2, prefix + n_vis + suffix
    kind = torch.full((B, N), int(Kind.PROTECTED))
    kind[:, prefix:prefix + n_vis] = int(Kind.VISUAL)
    x = torch.randn(B, N, 4)
    # protected prefix alone (a ViT): counts known on the host; with text after: one count read
    stream = TokenStream.start(x, kind=None if not suffix else kind, grid=grid, num_prefix=prefix)
    assert (stream.host_num_visual() is None) == bool(suffix)
    frame = torch.full((B, N), -1)
    frame[:, prefix:prefix + n_vis] = torch.arange(T).repeat_interleave(H * W)
    stream.frame = frame
    red = U.UniformPrune(keep=keep)
    assert U._whole_frames(stream) == (grid, n_vis)
    fast = red.plan(stream)
    monkeypatch.setattr(U, "_whole_frames", lambda s: None)
    slow = red.plan(stream)
    if slow is None:
        assert fast is None
        return
    assert fast is not None and torch.equal(fast.keep, slow.keep)
    assert fast.valid is None and slow.valid is None
