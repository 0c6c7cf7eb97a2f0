"""ATP-LLaVA (Ye et al., CVPR 2025): scores against brute force, dynamic spatial sampling,
instance- and layer-adaptive thresholds, inference pruning with generate (batch 2 left-padded),
training mode (soft key masks, gradients into the threshold module), the budget loss, and a short
CPU training run with accelerate."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import tokenreduce as tr  # noqa: E402
from tokenreduce import Kind, Policy, Stage, TokenStream  # noqa: E402
from tokenreduce.errors import PolicyError, SiteError  # noqa: E402
from tokenreduce.reducers.atp import ATP, atp_layers, atp_policy  # noqa: E402

pytest.importorskip("transformers")
import vlm_models as V  # noqa: E402

NEW = 3


# -- helpers ------------------------------------------------------------------------------------------
def _stream(B=2, n_text=(2, 4), H=4, W=4, frames=1, C=8, heads=4, kv=2, D=8, seed=0, layer=2, depth=8):
    g = torch.Generator().manual_seed(seed)
    nv = frames * H * W
    N = n_text[0] + nv + n_text[1]
    kind = torch.full((B, N), int(Kind.TEXT))
    frame = torch.full((B, N), -1)
    patch = torch.full((B, N), -1)
    a = n_text[0]
    kind[:, a:a + nv] = int(Kind.VISUAL)
    frame[:, a:a + nv] = torch.arange(frames).repeat_interleave(H * W)
    patch[:, a:a + nv] = torch.arange(H * W).repeat(frames)
    s = TokenStream(x=torch.randn(B, N, C, generator=g), pos=torch.arange(N).expand(B, N).clone(),
                    size=torch.ones(B, N), kind=kind, frame=frame, patch=patch, order="sequence", depth=depth,
                    layer=layer, own_layer=layer - 1, site=f"llm.layer.{layer}")
    q = torch.randn(B, heads, N, D, generator=g)
    k = torch.randn(B, kv, N, D, generator=g)
    s.signals.put("qk", layer - 1, s.pos, (q, k, D ** -0.5, torch.ones(B, N, dtype=torch.bool)))
    return s, q, k


def _brute_scores(s, q, k):
    """Full eager attention (head mean, causal), then the per-token averages by hand."""
    B, H, N, D = q.shape
    kk = k.repeat_interleave(H // k.shape[1], 1)
    logits = q @ kk.transpose(-1, -2) * D ** -0.5
    logits = logits.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    A = logits.softmax(-1).mean(1)  # (B, N, N)
    out_self, out_cross = torch.zeros(B, N), torch.zeros(B, N)
    for b in range(B):
        vis = torch.nonzero(s.visual[b]).flatten().tolist()
        txt = torch.nonzero(s.kind[b] == int(Kind.TEXT)).flatten().tolist()
        for v in vis:
            us = [u for u in vis if u > v]
            ts = [t for t in txt if t > v]
            out_self[b, v] = A[b, us, v].mean() if us else float("nan")
            out_cross[b, v] = A[b, ts, v].mean() if ts else float("nan")
    return out_self, out_cross


# -- scores ---------------------------------------------------------------------------------------------
def test_redundancy_scores_match_brute_force():
    s, q, k = _stream()
    red = ATP(chunk=5)  # several query chunks
    s_self, s_cross = red.redundancy_scores(s)
    b_self, b_cross = _brute_scores(s, q, k)
    vis = s.visual
    have = vis & ~b_self.isnan()
    assert torch.allclose(s_self[have], b_self[have], atol=1e-6)
    assert torch.allclose(s_cross[vis], b_cross[vis], atol=1e-6)
    # the last visual token has no later visual query: it gets the instance mean
    last = torch.nonzero(vis[0]).max()
    assert torch.isclose(s_self[0, last], b_self[0][have[0]].mean(), atol=1e-6)


def test_spatial_sampling_is_uniform_and_dynamic():
    s, _, _ = _stream(B=1, H=4, W=4)
    sp = ATP.spatial_scores(s)[0, 2:18].reshape(4, 4)
    # stride-2 blocks: one representative each (rate 4/16 -> 0.75); the stride-4 block: one (1/16 -> 0.9375)
    assert int((sp >= 0.75).sum()) == 4 and int((sp > 0.9).sum()) == 1
    reps = torch.nonzero(sp >= 0.75).tolist()
    assert sorted({r // 2 * 2 + c // 2 for r, c in reps}) == [0, 1, 2, 3]  # one per 2x2 block
    # after a prune the sampling follows the survivors: drop the first block's representative
    r0, c0 = reps[0]
    keep = torch.ones(s.pos.shape[1], dtype=torch.bool)
    keep[2 + r0 * 4 + c0] = False
    s2 = dataclasses.replace(s, **{f: getattr(s, f)[:, keep] for f in ("x", "pos", "size", "kind", "frame", "patch")})
    sp2 = ATP.spatial_scores(s2, [(4, 4)])[0]
    assert int((sp2 >= 0.75).sum()) == 4  # the block is still represented, by a survivor


def test_scores_are_batched_per_sample():
    s, _, _ = _stream(B=2, seed=3)
    one = dataclasses.replace(s, **{f: getattr(s, f)[1:] for f in ("x", "pos", "size", "kind", "frame", "patch")})
    one.signals = tr.stream.Signals()
    src_pos, (q, k, sc, v) = s.signals.raw("qk", 1)
    one.signals.put("qk", 1, one.pos, (q[1:], k[1:], sc, v[1:]))
    a = ATP().redundancy_scores(s)
    b = ATP().redundancy_scores(one)
    assert torch.allclose(a[0][1], b[0][0], atol=1e-6) and torch.allclose(a[1][1], b[1][0], atol=1e-6)


# -- the budget loss and helpers ---------------------------------------------------------------------------
def test_budget_loss_formula_and_layers():
    assert atp_layers(32) == [4, 14, 24]
    assert atp_layers(28) == [4, 12, 21] and atp_layers(4) == [1, 2, 3]
    with pytest.raises(PolicyError, match="at least 2 layers"):
        atp_layers(1)
    rec = {"depth": 8, "n0": torch.tensor([16.0]),
           "stages": [{"layer": 2, "kept": torch.tensor([8.0])}, {"layer": 5, "kept": torch.tensor([4.0])}]}
    loss = ATP().budget_loss(record=rec)
    # layer term: 0.5 * 2/8 + 0.25 * 5/8; per-layer kept: 1,1,.5,.5,.5,.25,.25,.25 -> avg 4.25/8
    want = 0.05 * (0.5 * 2 / 8 + 0.25 * 5 / 8) + 0.2 * abs(4.25 / 8 - 0.25)
    assert float(loss) == pytest.approx(want, rel=1e-6)


def test_bad_parameters_name_the_valid_choices(tmp_path):
    with pytest.raises(PolicyError, match="thresholds='auto' is not valid; choose one of: fixed, learned"):
        ATP(thresholds="auto")
    with pytest.raises(PolicyError, match=r"spatial_threshold must be a number in \(0.0, 1.0\)"):
        ATP(spatial_threshold=1.0)
    with pytest.raises(PolicyError, match="tau must be > 0"):
        ATP(tau=0)
    with pytest.raises(PolicyError, match="needs thresholds='learned'"):
        ATP(weights="x.safetensors")
    with pytest.raises(PolicyError, match="valid parameters: thresholds, alpha, spatial_threshold"):
        tr.Policy.from_spec("llm.layer.2=atp(theta=1)")
    p = tr.Policy.from_spec("llm.layer.2=atp(alpha=0.5, thresholds='learned')")
    assert tr.Policy.from_spec(p.to_spec()).stages[0].reducer == ATP(alpha=0.5, thresholds="learned")


# -- on the tiny models ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava():
    return V.llava("sdpa")


def _generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)


def test_sites_and_weights_errors(llava, tmp_path):
    with pytest.raises(SiteError, match="atp at 'llm.layer.0' needs the signal 'qk'"):
        tr.reduce(llava.model, "llm.layer.0=atp")
    with pytest.raises(SiteError, match="atp cannot run at site 'vision.out'"):
        tr.reduce(llava.model, "vision.out=atp")
    red = ATP(thresholds="learned")
    red.threshold_module([1])
    path = tmp_path / "t.safetensors"
    red.save_thresholds(path)
    with pytest.raises(PolicyError, match=r"hold thresholds for layers 1; this stage sits at llm.layer.2"):
        tr.reduce(llava.model, f"llm.layer.2=atp(thresholds='learned', weights='{path}')")


def test_thresholds_differ_across_instances_and_layers(llava):
    # training-free rule: θ_r follows each instance's score statistics
    red = ATP()
    with tr.reduce(llava.model, Policy([Stage("llm.layer.1", red), Stage("llm.layer.2", red)])):
        with torch.no_grad():
            llava.model(**llava.batch)
    st = red.last["stages"]
    assert [x["layer"] for x in st] == [1, 2]
    for x in st:
        assert x["theta_r"][0] != x["theta_r"][1]              # two different images
    assert not torch.equal(st[0]["theta_r"], st[1]["theta_r"])   # two layers
    # learned thresholds: a module whose output depends on the instance statistics, per layer
    red = ATP(thresholds="learned")
    red.threshold_module([1, 2])
    with torch.no_grad():
        for head in red.module.heads.values():
            torch.nn.init.normal_(head[2].weight, std=0.5, generator=torch.Generator().manual_seed(0))
    with tr.reduce(llava.model, Policy([Stage("llm.layer.1", red), Stage("llm.layer.2", red)])):
        with torch.no_grad():
            llava.model(**llava.batch)
    st = red.last["stages"]
    for key in ("theta_r", "theta_s"):
        for x in st:
            assert x[key][0] != x[key][1]
        assert not torch.equal(st[0][key], st[1][key])


@pytest.mark.parametrize("name,attn", [("llava", "sdpa"), ("llava", "eager"), ("llava_onevision", "sdpa"),
                                       ("qwen2_vl", "eager")])
def test_inference_prunes_and_generates(name, attn):
    case = V.BUILDERS[name](attn)
    m = case.model
    red = ATP()
    with tr.reduce(m, atp_policy(4, red)) as h:
        with torch.no_grad():
            a = m(**case.batch).logits
            b = m(**case.batch).logits
        assert torch.equal(a, b)  # deterministic
        stats = h.stats["tokens_per_layer"]
        assert stats[("llm", 3)] < stats[("llm", 1)] or stats[("llm", 1)] < case.batch["attention_mask"].sum(1).float().mean()
        kept = [x["kept"] for x in red.last["stages"]]
        assert bool((kept[-1] < case.visual).all())
        if name == "llava":  # the two images keep different numbers of tokens: a ragged plan
            assert kept[0][0] != kept[0][1]
        g = _generate(m, case.batch)
        singles = [_generate(m, s) for s in case.singles]
    assert g.sequences.shape == (2, case.batch["input_ids"].shape[1] + NEW)
    for i, single in enumerate(singles):
        assert torch.equal(g.sequences[i, -NEW:], single.sequences[0, -NEW:])
        for t in range(NEW):
            assert torch.allclose(g.scores[t][i], single.scores[t][0], atol=1e-4)


def test_training_mode_keeps_tokens_and_backpropagates(llava):
    m = llava.model
    red = ATP(thresholds="learned", training=True)
    with tr.reduce(m, atp_policy(4, red)) as h:
        for p in m.parameters():
            p.requires_grad_(False)
        logits = m(**llava.batch).logits
        n_in = llava.batch["attention_mask"].sum(1).float().mean()
        assert all(v == pytest.approx(float(n_in)) for v in h.stats["tokens_per_layer"].values())
        # the next-token loss alone reaches the thresholds through the soft key masks
        loss = torch.nn.functional.cross_entropy(logits[:, -1], torch.tensor([3, 4]))
        loss.backward(retain_graph=True)
        grads = [p.grad for p in red.parameters()]
        assert grads and all(g_ is not None for g_ in grads)
        assert sum(float(g_.abs().sum()) for g_ in grads) > 0
        # the budget loss too, from the soft keep fractions of that forward
        for p in red.parameters():
            p.grad = None
        frac = red.kept_fraction()
        assert bool(((frac > 0) & (frac < 1)).all()) and frac.requires_grad
        red.budget_loss().backward()
        assert sum(float(p.grad.abs().sum()) for p in red.parameters() if p.grad is not None) > 0
        # the same reducer at inference prunes
        red.eval()
        with torch.no_grad():
            m(**llava.batch)
        assert h.stats["tokens_per_layer"][("llm", 3)] < float(n_in)
    for p in m.parameters():
        p.requires_grad_(True)


def test_short_cpu_training_lowers_the_budget_loss(tmp_path, llava):
    from tokenreduce.eval.train_atp import main, train
    log = train(steps=20, out=tmp_path, batch=2, quiet=True)
    b = [s["budget"] for s in log["steps"]]
    assert sum(b[-5:]) / 5 < sum(b[:5]) / 5
    path = tmp_path / "atp_thresholds.safetensors"
    assert path.exists() and (tmp_path / "train_log.json").exists()
    # the saved thresholds load into a spec'd reducer and run at inference
    with tr.reduce(llava.model, f"llm.layer.1=atp(thresholds='learned', weights='{path}')") as h:
        red = h.stages[0][1]
        assert red.module.layers() == [1, 2, 3]
        with torch.no_grad():
            llava.model(**llava.batch)
    # the command line entry point
    assert main(["--steps", "2", "--out", str(tmp_path / "cli"), "--batch", "1"]) == 0
    assert (tmp_path / "cli" / "atp_thresholds.safetensors").exists()


def test_training_on_the_embedded_model_learns_thresholds_that_run(tmp_path):
    """train_atp --model embedded: the frozen video-QA model, fresh clips, one stage at
    llm.layer.2 starting from the fixed rule for the budget; the answer loss and the budget term
    reach the threshold head (its zero-initialised last layer moves), and the saved policy runs"""
    from safetensors.torch import load_file

    from tokenreduce.eval.embedded import load_embedded
    from tokenreduce.eval.train_atp import train_on_embedded
    log = train_on_embedded(steps=3, out=tmp_path, budget=0.3, batch=4, quiet=True)
    assert log["alpha"] == 0.5244 and all(0.1 < s["kept"] < 0.6 for s in log["steps"])
    weights = load_file(str(tmp_path / "atp_thresholds.safetensors"))
    assert float(weights["heads.2.2.weight"].abs().sum()) > 0
    assert "thresholds='learned'" in log["policy"]
    model, proc = load_embedded()
    from tokenreduce.eval.synthetic import VideoQAGenerator
    s = VideoQAGenerator(seed=5).sample("count")
    inputs = proc(text=[proc.prompt(s["question"], s["options"])], videos=[VideoQAGenerator(seed=5).render(s)])
    with tr.reduce(model, log["policy"]) as h, torch.no_grad():
        model(**inputs)
        assert h.stats["sites"]["llm.layer.2"]["tokens_out"] < h.stats["sites"]["llm.layer.2"]["tokens_in"]


def test_inference_atp_does_not_turn_other_merges_into_attention_biases():
    """ATP asks for log(size) key biases only while training (its soft masks); at inference a
    stage that keeps everything leaves FrameFusion's merges (whose sizes never reach the
    attention logits) exactly as they are without it"""
    case = V.llava_onevision("sdpa")
    ff = "llm.layer.0:3=framefusion(similarity_lower_bound=0.3, cost=0.5)"
    with torch.no_grad():
        with tr.reduce(case.model, ff):
            alone = case.model(**case.batch).logits
        with tr.reduce(case.model, ff + "; llm.layer.3=atp(alpha=-50.0, spatial_threshold=0.01)") as h:
            both = case.model(**case.batch).logits
            site = h.stats["sites"]["llm.layer.3"]
    assert site["tokens_in"] == site["tokens_out"]  # the ATP stage keeps every token
    assert torch.equal(alone, both)
