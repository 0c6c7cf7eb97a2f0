"""FrameFusion (Fu et al., ICCV 2025): the budget function and its docs/ALGORITHMS.md §8.5 anchors,
chain merges as plans, the merge/prune schedule against the compute budget, and end-to-end runs
on the tiny LLaVA-OneVision / LLaVA-NeXT-Video video models (batch 2 left-padded, SDPA and eager),
and the trained embedded model against a merge written out by hand."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import tokenreduce as tr  # noqa: E402
from tokenreduce import Kind, Policy, Reducer, Stage, TokenStream, apply_plan, register_reducer  # noqa: E402
from tokenreduce.errors import PolicyError, SiteError  # noqa: E402
from tokenreduce.reducers.framefusion import FrameFusion, compute_pruning_ratio  # noqa: E402

NEW = 3


# -- the budget -----------------------------------------------------------------------------------
def test_pruning_ratio_anchors():
    """§8.5: _compute_pruning_ratio([], 0.3) = 0.7; ([0.3, 0.1], 0.3) ≈ 0.5684 (28 layers)."""
    assert compute_pruning_ratio([], 0.3, 28) == pytest.approx(0.7, abs=1e-12)
    assert compute_pruning_ratio([0.3, 0.1], 0.3, 28) == pytest.approx(0.5684, abs=5e-5)


def _u_by_bisection(sparsity, cost, L):
    """u found independently: simulate the per-layer kept fraction and bisect on the summed cost."""
    def total(u):
        frac, s = [], 1.0
        for v in sparsity:
            s *= 1 - v
            frac.append(s)
        frac += [s * (1 - u)] * (L - len(sparsity))
        return sum(frac)
    lo, hi = 0.0, 1.0
    if total(0.0) <= L * cost:
        return 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) > L * cost else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("L", [4, 12, 28, 32, 80])
def test_pruning_ratio_other_depths(L):
    g = torch.Generator().manual_seed(L)
    assert compute_pruning_ratio([], 0.3, L) == pytest.approx(0.7)  # no layer run yet: 1 - cost
    for _ in range(20):
        n = int(torch.randint(0, min(4, L - 1) + 1, (1,), generator=g))
        sp = (torch.rand(n, generator=g) * 0.35).tolist()
        cost = float(0.2 + 0.5 * torch.rand(1, generator=g))
        try:
            u = compute_pruning_ratio(sp, cost, L)
        except ValueError:
            s, tot = 1.0, 0.0
            for v in sp:
                s *= 1 - v
                tot += s
            assert tot > L * cost  # raised only when the layers already run overspent the budget
            continue
        assert u == pytest.approx(_u_by_bisection(sp, cost, L), abs=1e-9)
        if u > 0:  # the budget identity: summed per-layer kept fraction == L * cost
            s, tot = 1.0, 0.0
            for v in sp:
                s *= 1 - v
                tot += s
            assert tot + (L - n) * s * (1 - u) == pytest.approx(L * cost, rel=1e-9)
    # the reference's hard-coded 28 is gone: the same history needs a different u at another depth
    assert compute_pruning_ratio([0.3, 0.1], 0.3, 80) != pytest.approx(compute_pruning_ratio([0.3, 0.1], 0.3, 28))


def test_pruning_ratio_limits():
    assert compute_pruning_ratio([0.9, 0.9], 0.9, 4) == 0.0  # budget met: nothing more to remove
    with pytest.raises(ValueError, match="cost is too small"):
        compute_pruning_ratio([0.0, 0.0, 0.0], 0.3, 4)


# -- chain merges as plans --------------------------------------------------------------------------
def _video_stream(x, frames, patches, n_text=(1, 1), depth=28, layer=0):
    """A hand-built LLM stream: n_text[0] text tokens, frames x patches video tokens, n_text[1] text."""
    B, N, C = x.shape
    kind = torch.full((B, N), int(Kind.TEXT))
    frame = torch.full((B, N), -1)
    patch = torch.full((B, N), -1)
    a = n_text[0]
    kind[:, a:a + frames * patches] = int(Kind.VISUAL)
    frame[:, a:a + frames * patches] = torch.arange(frames).repeat_interleave(patches)
    patch[:, a:a + frames * patches] = torch.arange(patches).repeat(frames)
    return TokenStream(x=x, pos=torch.arange(N).expand(B, N).clone(), size=torch.ones(B, N), kind=kind, frame=frame,
                       patch=patch, order="sequence", depth=depth, layer=layer, own_layer=layer - 1 if layer else None,
                       site=f"llm.layer.{layer}")


def _chain_video(g):
    """4 frames x 2 patches. Patch 0: one slowly drifting vector (a chain over frames 1..3); patch 1:
    unrelated vectors except frame 3 ≈ frame 2."""
    C = 8
    base = torch.randn(C, generator=g)
    vid = torch.zeros(4, 2, C)
    for f in range(4):
        vid[f, 0] = base + 0.05 * torch.randn(C, generator=g)
        vid[f, 1] = torch.randn(C, generator=g) * 3
    vid[1, 1] = -vid[0, 1]  # clearly dissimilar
    vid[2, 1] = -vid[1, 1] + torch.randn(C, generator=g)
    vid[3, 1] = vid[2, 1] + 0.05 * torch.randn(C, generator=g)
    text = torch.randn(2, C, generator=g)
    return torch.cat([text[:1], vid.reshape(8, C), text[1:]])[None]


def test_chain_merge_is_mean_of_m_plus_1():
    x = _chain_video(torch.Generator().manual_seed(0))
    s = _video_stream(x, 4, 2)
    red = FrameFusion(cost=0.3, similarity_lower_bound=0.9)
    order, sim = red.similarity_by_patch(s, 0)
    # sorted by patch then frame; similarity to the predecessor at the same patch (-2: none)
    assert order.tolist() == [1, 3, 5, 7, 2, 4, 6, 8]
    assert sim[0] == -2 and sim[4] == -2 and bool((sim[1:4] > 0.9).all()) and sim[7] > 0.9 and sim[5] < 0.9
    plan = red.plan(s)
    out, applied = apply_plan(s, plan)
    # 4 of 8 visual tokens merge (ratio 0.5 < u = 0.7): patch 0 frames 1-3 into frame 0, patch 1 frame 3 into 2
    assert out.pos[0].tolist() == [0, 1, 2, 4, 6, 9]
    v = x[0]
    assert torch.allclose(out.x[0, 1], v[[1, 3, 5, 7]].mean(0), atol=1e-6)   # chain of m=3: mean of 4
    assert torch.allclose(out.x[0, 4], v[[6, 8]].mean(0), atol=1e-6)         # chain of m=1: mean of 2
    assert torch.equal(out.x[0, [0, 2, 3, 5]], v[[0, 2, 4, 9]])              # others untouched
    assert out.size[0].tolist() == [1, 4, 1, 1, 2, 1] and out.size.sum() == 10  # sizes conserved
    st = s.memo[f"framefusion@{id(red)}"]
    assert st["sparsity"][0] == [0.5] and st["phase"][0] == 0  # still merging (0.5 >= ratio_lower_bound)


@pytest.mark.parametrize("mode", ["equal", "size"])
def test_cascaded_merges_equal_vs_size_weights(mode):
    """Layer 0 merges frame 1 into frame 0, layer 1 merges frame 2 into that anchor. 'equal' is the
    reference's cascade ((a+b)/2 + c)/2; 'size' the mean over original tokens (a+b+c)/3."""
    g = torch.Generator().manual_seed(1)
    C = 6
    a = torch.randn(C, generator=g)
    b = a + 0.01 * torch.randn(C, generator=g)
    c = -a  # not similar at layer 0 ...
    x = torch.stack([torch.randn(C, generator=g), a, b, c, torch.randn(C, generator=g)])[None]
    red = FrameFusion(cost=0.1, similarity_lower_bound=0.9, ratio_lower_bound=0.0, merge_weight=mode)
    s = _video_stream(x, 3, 1, depth=28, layer=0)
    s, _ = apply_plan(s, red.plan(s))
    assert s.pos[0].tolist() == [0, 1, 3, 4]
    # ... and the layer in between made it similar to the merged anchor
    x1 = s.x.clone()
    x1[0, 2] = x1[0, 1] * 1.001 + 0.0  # frame 2 token now ≈ anchor
    c_new = x1[0, 2].clone()
    s = dataclasses.replace(s, x=x1, layer=1, own_layer=0, site="llm.layer.1")
    s, _ = apply_plan(s, red.plan(s))
    assert s.pos[0].tolist() == [0, 1, 4]
    want = ((a + b) / 2 + c_new) / 2 if mode == "equal" else ((a + b) + c_new) / 3
    assert torch.allclose(s.x[0, 1], want, atol=1e-6)
    assert s.size[0, 1] == 3


# -- the schedule against the budget, simulated over many layers ----------------------------------------
def _sample(seed, frames, patches, drift, C=16):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, patches, C, generator=g)
    vid = base + drift * torch.randn(frames, patches, C, generator=g)
    return torch.cat([torch.randn(2, C, generator=g), vid.reshape(-1, C), torch.randn(3, C, generator=g)])


def _attn(pos, layer, seed):
    """A deterministic stand-in for the last-query attention: a function of (token, layer, sample)."""
    v = torch.sin(pos.double() * 12.9898 + layer * 78.233 + seed * 3.7) * 43758.5453
    return (v - v.floor()).float()


def _simulate(L, frames=8, patches=64, cost=0.3, seeds=(0, 1), drifts=(0.6, 0.6), pads=(0, 0), S=0.6):
    """Run the reducer layer by layer on synthetic video streams (one per seed); the features
    move a little between layers (the same for every sample, whatever the batch)."""
    x = torch.stack([_sample(sd, frames, patches, d) for sd, d in zip(seeds, drifts)])
    s = _video_stream(x, frames, patches, n_text=(2, 3), depth=L)
    valid = torch.ones(s.pos.shape, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False  # left padding
    s = dataclasses.replace(s, valid=valid)
    red = FrameFusion(cost=cost, similarity_lower_bound=S)
    counts = []
    for k in range(L):
        s = dataclasses.replace(s, layer=k, own_layer=k - 1 if k else None, site=f"llm.layer.{k}",
                                x=s.x * (1 + 0.01 * torch.cos(s.pos.float() + k))[..., None])
        if k:
            att = torch.stack([_attn(s.pos[b], k - 1, sd) for b, sd in enumerate(seeds)])
            s.signals.put("last_query_attn", k - 1, s.pos, att)
        p = red.plan(s)
        if p is not None:
            s, _ = apply_plan(s, p)
        counts.append(s.num_visual().float())
        s.memo.setdefault("visual_pos", []).append([s.pos[b][s.visual[b]] for b in range(len(seeds))])
    return torch.stack(counts), s.memo[f"framefusion@{id(red)}"], frames * patches, s


@pytest.mark.parametrize("L", [28, 32])
def test_schedule_meets_the_cost_budget(L):
    counts, st, n0, _ = _simulate(L)
    spent = counts.sum(0) / n0  # layer-equivalents of visual-token compute, per sample
    for b in range(counts.shape[1]):
        kinds = [h[0] for h in st["history"][b]]
        assert kinds[0] == "merge" and kinds.count("prune") <= 1
        # each layer's count is an integer: allow one token of rounding per layer
        assert float(spent[b]) == pytest.approx(L * 0.3, abs=L / n0), (st["history"][b], spent[b])
    counts2, _, _, _ = _simulate(L)
    assert torch.equal(counts, counts2)  # deterministic


def test_merge_then_prune_uses_last_query_attention():
    """A merge that stops (ratio < ratio_lower_bound) hands over to pruning at the next site:
    the top round(n(1-u)) visual tokens by last-query attention stay, then nothing more happens."""
    counts, st, n0, s = _simulate(28, drifts=(3.0, 3.0), seeds=(0, 1))  # dissimilar: few merges
    for b in range(2):
        h = st["history"][b]
        assert [e[0] for e in h] == ["merge", "prune"]
        _, k, u, removed = h[1]
        n = int(counts[k - 1, b])
        assert removed == n - round(n * (1 - u))
        assert int(counts[k, b]) == round(n * (1 - u)) and bool((counts[k:, b] == counts[k, b]).all())
        # the survivors are the visual tokens with the highest attention at layer k-1
        cand = s.memo["visual_pos"][k - 1][b]  # the visual tokens entering the pruning site
        att = _attn(cand, k - 1, b)
        top = cand[torch.argsort(att, descending=True, stable=True)[:int(counts[k, b])]]
        assert sorted(s.pos[b][s.visual[b]].tolist()) == sorted(top.tolist())


def _valid_rows(s, b):
    m = s.valid[b] if s.valid is not None else torch.ones(s.pos.shape[1], dtype=torch.bool)
    return s.x[b][m], s.pos[b][m], s.size[b][m]


def test_ragged_batch_equals_each_sample_alone():
    """Sample 0 merges a lot, sample 1 nothing: a ragged plan. With prompt padding in the sample
    that needs padding slots, every sample's tokens equal its batch-1 run exactly."""
    kw = dict(L=28, frames=4, patches=16)
    counts, _, _, s = _simulate(seeds=(0, 1), drifts=(0.3, 3.0), pads=(2, 0), **kw)
    assert not torch.equal(counts[:, 0], counts[:, 1])
    for b, (sd, d, p) in enumerate([(0, 0.3, 2), (1, 3.0, 0)]):
        c1, _, _, s1 = _simulate(seeds=(sd,), drifts=(d,), pads=(p,), **kw)
        assert torch.equal(counts[:, b], c1[:, 0])
        xb, pb, zb = _valid_rows(s, b)
        x1, p1, z1 = _valid_rows(s1, 0)
        assert torch.equal(pb, p1) and torch.equal(zb, z1)
        assert torch.allclose(xb, x1, atol=1e-6)


def test_ragged_batch_without_spare_tokens():
    """No prompt padding where a ragged plan needs padding slots: the merges stay exact and each
    sample matches its batch-1 run (padding slots claim nothing in apply_plan)."""
    kw = dict(L=28, frames=4, patches=16)
    counts, st, _, s = _simulate(seeds=(0, 1), drifts=(0.3, 3.0), pads=(0, 0), **kw)
    c0, _, _, s0 = _simulate(seeds=(0,), drifts=(0.3,), pads=(0,), **kw)
    assert counts[0, 0] == c0[0, 0]
    assert torch.allclose(_valid_rows(s, 0)[0], _valid_rows(s0, 0)[0], atol=1e-6)


# -- parameters and sites --------------------------------------------------------------------------------
def test_bad_parameters_name_the_valid_choices():
    with pytest.raises(PolicyError, match=r"cost must be a number in \(0.0, 1.0\]"):
        FrameFusion(cost=0)
    with pytest.raises(PolicyError, match="merge_weight='mean' is not valid; choose one of: equal, size"):
        FrameFusion(merge_weight="mean")
    with pytest.raises(PolicyError, match="num_queries must be an int >= 1"):
        FrameFusion(num_queries=0)
    with pytest.raises(PolicyError, match=r"similarity_lower_bound must be a number in \[-1.0, 1.0\]"):
        FrameFusion(similarity_lower_bound=2)
    with pytest.raises(PolicyError, match="valid parameters: cost, similarity_lower_bound, ratio_lower_bound"):
        tr.Policy.from_spec("llm.layer.*=framefusion(budget=0.3)")
    p = tr.Policy.from_spec("llm.layer.*=framefusion(cost=0.3, similarity_lower_bound=0.6, ratio_lower_bound=0.1)")
    assert p.to_spec() == "llm.layer.*=framefusion"
    p = tr.Policy.from_spec("llm.layer.*=framefusion(cost=0.2, num_queries=4)")
    assert tr.Policy.from_spec(p.to_spec()).stages[0].reducer == FrameFusion(cost=0.2, num_queries=4)


# -- end to end on the tiny video models --------------------------------------------------------------------
pytest.importorskip("transformers")
import vlm_models as V  # noqa: E402


@register_reducer
@dataclasses.dataclass
class VisualCount(Reducer):
    """Test probe: records the visual tokens per sample entering each LLM layer."""

    name = "ff_visual_count_test"
    summary = "test only"

    def plan(self, stream):
        stream.memo.setdefault("visual_counts", []).append(stream.num_visual().tolist())
        self.memo = stream.memo
        return None


def _generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)


@pytest.fixture(scope="module")
def cases():
    out = {}
    for name in ("llava_onevision", "llava_next_video"):
        for attn in ("sdpa", "eager"):
            out[(name, attn)] = V.BUILDERS[name](attn)
    return out


@pytest.mark.parametrize("name", ["llava_onevision", "llava_next_video"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_end_to_end_video_models(cases, name, attn):
    case = cases[(name, attn)]
    m = case.model
    ff = FrameFusion(cost=0.3, similarity_lower_bound=0.3)
    probe = VisualCount()
    with tr.reduce(m, Policy([Stage("llm.layer.*", ff), Stage("llm.layer.*", probe)])) as h:
        with torch.no_grad():
            a = m(**case.batch).logits
            st = dict(probe.memo[f"framefusion@{id(ff)}"])
            counts = torch.tensor(probe.memo["visual_counts"]).float()
            b = m(**case.batch).logits
        assert torch.equal(a, b)  # deterministic
        assert a.shape[:2] == case.batch["input_ids"].shape
        assert bool(torch.isfinite(a[case.batch["attention_mask"].bool()]).all())
        n0 = case.visual - (1 if name == "llava_onevision" else 0)  # OneVision's newline is protected
        assert bool((counts[-1] < n0).all()) and h.stats["sites"]["llm.layer.1"]["tokens_out"] < \
            h.stats["sites"]["llm.layer.0"]["tokens_in"]
        for b_ in range(2):
            assert st["history"][b_][0][0] == "merge"
        g = _generate(m, case.batch)
        singles = [_generate(m, s) for s in case.singles]
    # batch == single, ragged plans included (padding slots claim nothing in apply_plan)
    assert g.sequences.shape == (2, case.batch["input_ids"].shape[1] + NEW)
    for b_, single in enumerate(singles):
        assert torch.equal(g.sequences[b_, -NEW:], single.sequences[0, -NEW:])
        for t in range(NEW):
            assert torch.allclose(g.scores[t][b_], single.scores[t][0], atol=1e-4)


def _deep_onevision(layers=12):
    """the tiny OneVision case with a `layers`-layer Qwen2 decoder"""
    import transformers as tf
    orig = V._qwen2

    def deeper(vocab=128):
        d = orig(vocab).to_dict()
        d["num_hidden_layers"] = layers
        d.pop("layer_types", None)
        return tf.Qwen2Config(**d)
    V._qwen2 = deeper
    try:
        return V.llava_onevision("sdpa")
    finally:
        V._qwen2 = orig


def test_end_to_end_keeps_about_the_budget():
    """A 12-layer OneVision: the summed per-layer visual fraction ≈ depth * cost (one token of
    rounding per layer), with the model's real depth in the budget."""
    case = _deep_onevision(12)
    ff = FrameFusion(cost=0.3, similarity_lower_bound=0.3)
    probe = VisualCount()
    with tr.reduce(case.model, Policy([Stage("llm.layer.*", ff), Stage("llm.layer.*", probe)])):
        with torch.no_grad():
            case.model(**case.batch)
    counts = torch.tensor(probe.memo["visual_counts"]).float()
    n0 = case.visual - 1
    assert counts.shape == (12, 2)
    spent = counts.sum(0) / n0
    assert torch.allclose(spent, torch.full((2,), 12 * 0.3), atol=12 / n0), spent


def test_sites_and_errors_on_a_model(cases):
    case = cases[("llava_onevision", "sdpa")]
    with pytest.raises(SiteError, match="framefusion cannot run at site 'projector.out'"):
        tr.reduce(case.model, "projector.out=framefusion")
    with pytest.raises(PolicyError, match="num_layers=2 but the stage sits at llm.layer.2"):
        tr.reduce(case.model, "llm.layer.*=framefusion(num_layers=2)")
    h = tr.reduce(case.model, "llm.layer.*=framefusion(num_queries=4)")
    with torch.no_grad():
        case.model(**case.batch)
    h.remove()


def _merge_by_hand(x, visual, frames, per_frame, keep_fraction):
    """FrameFusion's layer-0 merge written out independently of tokenreduce: the top
    (1 - keep_fraction) of the visual tokens by cosine similarity to the same patch position in
    the previous frame fold, chain by chain, into the chain's earliest token (their mean).
    Returns (hidden states, position ids) of the survivors, positions as in the full sequence."""
    T, P = frames, per_frame
    v = x[visual].view(T, P, -1)
    sim = torch.nn.functional.cosine_similarity(v[1:], v[:-1], dim=-1)  # (T-1, P): frame t+1 vs t
    order = torch.argsort(sim.T.reshape(-1), descending=True, stable=True)[: int((1 - keep_fraction) * T * P)]
    merged = torch.zeros(P, T, dtype=torch.bool)
    for j in order.tolist():
        p, t = divmod(j, T - 1)
        merged[p, t + 1] = True
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    out = x.clone()
    for p in range(P):
        t = 0
        while t < T:
            end = t + 1
            while end < T and merged[p, end]:
                end += 1
            members = visual[torch.arange(t, end) * P + p]
            out[members[0]] = x[members].mean(0)
            keep[members[1:]] = False
            t = end
    return out[keep], torch.nonzero(keep).flatten()


def test_matches_a_hand_written_merge_on_the_trained_model():
    """On the trained embedded LLaVA-OneVision (real weights, so similarities rank real content):
    with 4 layers, cost 0.3 leaves u = 0.7 at layer 0, the budget is met by merging alone, and the
    reduced model's answer logits equal a hand-written merge fed to the bare decoder with the
    survivors' original positions."""
    from tokenreduce.eval.embedded import load_embedded
    from tokenreduce.eval.synthetic import VideoQAGenerator
    torch.manual_seed(0)
    model, proc = load_embedded()
    lm = model.model.language_model
    assert compute_pruning_ratio([], 0.3, lm.config.num_hidden_layers) == pytest.approx(0.7)
    seen = {}
    hook = lm.layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.__setitem__("x", (a[0] if a else k["hidden_states"]).detach().clone()), with_kwargs=True)
    gen = VideoQAGenerator(frames=8, seed=4242)
    try:
        for qtype in ("brief_color", "start_end", "count"):
            s = gen.sample(qtype)
            batch = proc(text=[proc.prompt(s["question"], s["options"])], videos=[gen.render(s)])
            with torch.no_grad():
                model(**batch)
            ids = batch["input_ids"][0]
            visual = torch.nonzero(ids == model.config.video_token_id).flatten()[:-1]  # the last is the newline
            x, pos = _merge_by_hand(seen["x"][0], visual, 8, proc.tokens_per_frame, keep_fraction=0.3)
            with torch.no_grad():
                want = model.lm_head(lm(inputs_embeds=x[None], position_ids=pos[None]).last_hidden_state[:, -1])
                with tr.reduce(model, "llm.layer.*=framefusion(cost=0.3)") as h:
                    got = model(**batch).logits[:, -1]
                    merged_out = h.stats["sites"]["llm.layer.0"]["tokens_out"]
            assert merged_out == x.shape[0]
            assert torch.allclose(got, want, atol=1e-4), (qtype, (got - want).abs().max())
    finally:
        hook.remove()


def test_no_signal_is_computed_after_framefusion_is_done(monkeypatch):
    """once every sample has pruned (FrameFusion's last step), later layers compute no attention
    rows for it (Reducer.may_act); the logits are those of a run that computes them all"""
    from tokenreduce.adapters import hf_llm
    case = _deep_onevision(12)
    calls = []
    real = hf_llm.last_query_attention
    monkeypatch.setattr(hf_llm, "last_query_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ff = FrameFusion(cost=0.3, similarity_lower_bound=0.3)
    with tr.reduce(case.model, Policy([Stage("llm.layer.*", ff)])), torch.no_grad():
        skipping = case.model(**case.batch).logits
        n_skipping = len(calls)
        calls.clear()
        monkeypatch.setattr(FrameFusion, "may_act", lambda self, memo: True)
        every = case.model(**case.batch).logits
        n_every = len(calls)
    assert n_every == 11  # layers 0..10 feed the sites at layers 1..11
    assert 0 < n_skipping < n_every
    assert torch.equal(skipping, every)


def test_a_reducer_may_have_its_own_field_named_active(cases):
    """the adapter asks reducers `may_act(memo)`; a user's reducer with an `active` switch of its
    own still runs at an LLM site"""
    from tokenreduce.reducers.fastv import FastV

    @dataclasses.dataclass
    class SwitchedFastV(FastV):
        name = "switched_fastv_test"
        active: bool = True
    case = cases[("llava_onevision", "sdpa")]
    with tr.reduce(case.model, Policy([Stage("llm.layer.2", SwitchedFastV(ratio=0.5))])) as h, torch.no_grad():
        assert case.model(**case.batch).logits.shape[:2] == case.batch["input_ids"].shape
        assert h.stats["sites"]["llm.layer.2"]["tokens_out"] < h.stats["sites"]["llm.layer.2"]["tokens_in"]
