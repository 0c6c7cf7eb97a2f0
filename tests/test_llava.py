"""LLaVA family (LLaVA-1.5, NeXT, OneVision, NeXT-Video, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL,
Gemma 3, Mistral 3, Aya Vision, PaliGemma) on tiny configs: the README's
adapter invariants 1-4 and 6 under SDPA and eager, batch 1 and batch 2 left-padded, forward and generate;
FastV's anchor (docs/ALGORITHMS.md §8.7)."""
import dataclasses

import pytest
import torch

import tokenreduce as tr
from tokenreduce.errors import PolicyError
from concurrency import failures_in_threads

pytest.importorskip("transformers")
import vlm_models as V  # noqa: E402

NEW = 4
CASES = [(name, attn) for name in V.BUILDERS for attn in ("sdpa", "eager")]


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def case(request):
    name, attn = request.param
    return V.BUILDERS[name](attn)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _generate(model, inputs, new=NEW, **kw):
    return model.generate(**inputs, max_new_tokens=new, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, **kw)


def assert_same_generation(batched, b, single, tol=1e-4):
    """Batch row b and a batch-1 run give the same tokens, except where the two best scores are
    tied within float noise (then both runs must agree up to that step)."""
    for t in range(NEW):
        sb, s1 = batched.scores[t][b], single.scores[t][0]
        assert torch.allclose(sb, s1, atol=tol), f"step {t}: scores differ by {(sb - s1).abs().max():.2e}"
        top2 = s1.topk(2).values
        if batched.sequences[b, -NEW + t] != single.sequences[0, -NEW + t]:
            assert float(top2[0] - top2[1]) < tol, f"step {t}: different tokens without a tie"
            return


def _keep_all_spec(case):
    spec = "projector.out=keep_all_test; llm.layer.1=keep_all_test; llm.layer.3=keep_all_test(merge=True)"
    if case.name == "llava":
        spec += "; vision.block.1=keep_all_test(merge=True); vision.out=keep_all_test"
    if case.video and not case.name.startswith("qwen"):  # Qwen's flat patches: no frames site
        spec = "frames=keep_all_test; " + spec
    return spec


def test_keep_all_is_identical(case):
    """Invariant 1 (forward logits and generated tokens)."""
    base = _logits(case.model, case.batch)
    g0 = _generate(case.model, case.batch)
    with tr.reduce(case.model, _keep_all_spec(case)) as h:
        out = _logits(case.model, case.batch)
        g = _generate(case.model, case.batch)
        assert h.stats["sites"]["llm.layer.1"]["tokens_out"] == h.stats["sites"]["llm.layer.1"]["tokens_in"]
    assert torch.equal(out, base)
    assert torch.equal(g.sequences, g0.sequences)


def test_remove_restores_exactly(case):
    """Invariant 2: hooks, per-instance wrappers and the attention implementation all go away."""
    m = case.model
    base = _logits(m, case.batch)
    impl = m.model.language_model.config._attn_implementation
    n_hooks = sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())
    h = tr.reduce(m, "projector.out=random(keep=0.5); llm.layer.2=fastv(ratio=0.5)")
    assert m.model.language_model.config._attn_implementation == f"tokenreduce_{impl}"
    assert "get_image_features" in vars(m.model)
    reduced = _logits(m, case.batch)
    assert not torch.equal(reduced, base)
    h.remove()
    assert torch.equal(_logits(m, case.batch), base)
    assert m.model.language_model.config._attn_implementation == impl
    assert "get_image_features" not in vars(m.model) and "get_video_features" not in vars(m.model)
    assert sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules()) == n_hooks


def _masked_reference(model, inputs, K, kept_cols, attentions=False):
    """The unreduced model with the dropped keys masked out in layers >= K: its logits (or its
    attention weights)."""
    B, L = inputs["input_ids"].shape
    dropped = torch.ones(B, L, dtype=torch.bool)
    dropped.scatter_(1, kept_cols, False)

    def hook(module, args, kwargs):
        am = kwargs.get("attention_mask")
        if am is None:
            am = torch.ones(L, L, dtype=torch.bool).tril()[None, None].expand(B, 1, L, L)
        if am.dtype == torch.bool:
            am = am & ~dropped[:, None, None, :]
        else:
            am = am.masked_fill(dropped[:, None, None, :], torch.finfo(am.dtype).min)
        kwargs["attention_mask"] = am
        return args, kwargs
    layers = model.model.language_model.layers
    hs = [layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in range(K, len(layers))]
    try:
        if attentions:
            with torch.no_grad():
                return model(**inputs, output_attentions=True).attentions
        return _logits(model, inputs)
    finally:
        for x in hs:
            x.remove()


def test_drop_at_layer_equals_masking(case):
    """Invariant 3: dropping tokens at llm.layer.K == masking the same keys in layers >= K."""
    K = 2
    with tr.reduce(case.model, f"llm.layer.{K}=fastv(ratio=0.5)") as h:
        pruned = _logits(case.model, case.batch)
        kept = h.trace[f"llm.layer.{K}"]["pos"]
    assert kept.shape[1] < case.batch["input_ids"].shape[1]
    ref = _masked_reference(case.model, case.batch, K, kept)
    assert torch.allclose(pruned[:, -1], ref[:, -1], atol=1e-5), (pruned[:, -1] - ref[:, -1]).abs().max()


@pytest.mark.parametrize("spec", ["llm.layer.2=fastv(ratio=0.5)",
                                  "projector.out=random(keep=0.5, shared=True); llm.layer.1=fastv(ratio=0.5)",
                                  # ATP's per-sample counts make a ragged batch: FastV must read each
                                  # sample's own last token, not the padding slot after it
                                  "llm.layer.1=atp; llm.layer.3=fastv(ratio=0.5)",
                                  # the first layer's cache shortened: decode positions still line up
                                  "llm.layer.0=uniform(keep=0.5)"])
def test_generate_batch_matches_single(case, spec):
    """Invariant 4: generate with KV cache, batch 2 left-padded == each sample alone."""
    if spec.startswith("llm.layer.1=atp") and case.name == "aya_vision":
        # ATP's counts differ per row: Cohere 2's sliding-window layers (window 6, shorter than
        # the prompt) would keep padding slots instead of the shorter row's tokens: refused
        with tr.reduce(case.model, spec), pytest.raises(tr.SiteError, match="sliding window of 6.*one sample"):
            _generate(case.model, case.batch)
        return
    with tr.reduce(case.model, spec) as h:
        g = _generate(case.model, case.batch)
        lens = [layer.keys.shape[-2] for layer in g.past_key_values.layers]
        singles = [_generate(case.model, s) for s in case.singles]
    # each layer's cache keeps its own length: shorter after the reduction
    full = case.batch["input_ids"].shape[1] + NEW - 1
    first_sliding = getattr(g.past_key_values.layers[0], "is_sliding", False)  # it holds its window only
    assert lens[-1] < full and (lens[-1] < lens[0] or spec.startswith(("projector", "llm.layer.0")) or first_sliding)
    for b, single in enumerate(singles):
        assert_same_generation(g, b, single)


# (not qwen2_vl / qwen3_vl: their random-init tiny models' first greedy token is the image
# placeholder (qwen3_vl's once reduced), which transformers itself refuses to re-prefill without
# a cache, unreduced too)
@pytest.mark.parametrize("name", [n for n in V.BUILDERS if n not in ("qwen2_vl", "qwen3_vl")])
def test_generate_without_cache_after_a_reduction_before_the_llm(name):
    """generate(use_cache=False) feeds the features it computed once (already reduced) to every
    step's prefill: they are recognised, and greedy decoding matches the cached run"""
    case = V.BUILDERS[name]("sdpa")
    spec = "projector.out=random(keep=0.5, shared=True)"
    with tr.reduce(case.model, spec) as h:
        cached = _generate(case.model, case.singles[0])
        want = h.stats["sites"]["projector.out"]
        fresh = _generate(case.model, case.singles[0], use_cache=False)
        # the last step's record reports the reduction its reused features carry
        got = h.stats["sites"].get("projector.out")
    assert_same_generation(fresh, 0, cached)
    assert got is not None and (got["tokens_in"], got["tokens_out"]) == (want["tokens_in"], want["tokens_out"])


def test_labels_loss_leaves_out_positions_dropped_inside_the_llm():
    """a position FastV drops has no logits (zeros in the realigned output): the label it would
    predict is left out of the model's own loss, not scored as a uniform guess; the caller's
    labels are untouched"""
    case = V.llava("sdpa")
    single = case.singles[0]
    labels = single["input_ids"].clone()
    before = labels.clone()
    with torch.no_grad(), tr.reduce(case.model, "llm.layer.2=fastv(ratio=0.5)"):
        out = case.model(**single, labels=labels)
    dropped = (out.logits[0] == 0).all(-1)
    assert 0 < int(dropped.sum()) < dropped.numel()
    target = labels[0, 1:].masked_fill(dropped[:-1], -100)
    want = torch.nn.functional.cross_entropy(out.logits[0, :-1], target, ignore_index=-100)
    assert torch.allclose(out.loss, want, atol=1e-6)
    assert torch.equal(labels, before)


def test_inputs_embeds_with_images_is_refused_by_a_reduced_vlm():
    case = V.llava("sdpa")
    single = case.singles[0]
    emb = case.model.get_input_embeddings()(single["input_ids"])
    with torch.no_grad(), tr.reduce(case.model, "llm.layer.2=fastv(ratio=0.5)"):
        with pytest.raises(tr.SiteError, match="needs input_ids.*inputs_embeds"):
            case.model(inputs_embeds=emb, attention_mask=single["attention_mask"], pixel_values=single["pixel_values"])


def test_projector_out_stats_average_items_of_different_sizes():
    """Qwen2-VL items of 4, 4, 4 and 8 tokens run as two size groups at projector.out: the site's
    stats are the mean per item (5 -> 2.5), not the mean of the two groups' means (6 -> 3)"""
    case = V.qwen2_vl("sdpa")
    img = V.IMG
    grids = torch.tensor([[1, 4, 4], [1, 4, 4], [1, 4, 4], [1, 4, 8]])
    pix = torch.randn(16 * 3 + 32, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    r0 = [5, 20] + [img] * 4 + [21, 20] + [img] * 4 + [21, 8]
    r1 = [5, 20] + [img] * 4 + [21, 20] + [img] * 8 + [21, 9]
    ids = torch.tensor([[0] * (len(r1) - len(r0)) + r0, r1])
    batch = dict(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values=pix, image_grid_thw=grids,
                 mm_token_type_ids=(ids == img).long())
    with torch.no_grad(), tr.reduce(case.model, "projector.out=random(keep=0.5)") as h:
        case.model(**batch)
    st = h.stats["sites"]["projector.out"]
    assert (st["tokens_in"], st["tokens_out"], st["calls"]) == (5.0, 2.5, 2)
    # the trace covers every item, in item order (rows padded to the longest), not the last group
    tr_ = h.trace["projector.out"]
    assert tr_["pos"].shape == (4, 4) and tr_["valid"].sum(1).tolist() == [2, 2, 2, 4]
    assert ((tr_["pos"] >= 0) == tr_["valid"]).all() and (tr_["pos"][:3] < 4).all()
    assert (tr_["pos"][tr_["valid"]] >= 0).all() and int(tr_["pos"][3].max()) < 8


@pytest.mark.parametrize("spec", ["llm.layer.2=uniform(keep=2)", "llm.layer.2=atp(spatial_threshold=0.5)"])
def test_spatial_reducers_in_the_llm_use_each_rows_own_grid(spec):
    """Qwen2-VL images of 4x4 and 4x8 patches (2x2 and 2x4 tokens) in one batch: the rows' grids
    differ, so each row's lattice comes from its own grid, as when it runs alone"""
    case = V.qwen2_vl("sdpa")
    img = V.IMG
    grids = [torch.tensor([[1, 4, 4]]), torch.tensor([[1, 4, 8]])]
    pix = [torch.randn(n, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(i + 1))
           for i, n in enumerate((16, 32))]
    rows = [[5, 6, 20] + [img] * 4 + [21, 8, 9, 10], [5, 20] + [img] * 8 + [21, 8, 9]]
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    batch = dict(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values=torch.cat(pix),
                 image_grid_thw=torch.cat(grids), mm_token_type_ids=(ids == img).long())
    singles = [dict(input_ids=torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long),
                    pixel_values=p, image_grid_thw=g, mm_token_type_ids=(torch.tensor([r]) == img).long())
               for r, p, g in zip(rows, pix, grids)]
    with torch.no_grad(), tr.reduce(case.model, spec):
        together = case.model(**batch).logits[:, -1]
        alone = [case.model(**s).logits[0, -1] for s in singles]
    for b in range(2):
        assert torch.allclose(together[b], alone[b], atol=1e-5), f"row {b}"


@pytest.mark.parametrize("spec", ["llm.layer.2=fastv(ratio=0.5)", "projector.out=random(keep=0.5, shared=True)",
                                  "llm.layer.0=uniform(keep=0.5)"])
def test_hidden_states_are_realigned_to_the_input_like_the_logits(spec):
    """output_hidden_states=True: every layer's states come back at the input's length (dropped
    positions read zeros), so they stack, index by input position and give the logits"""
    case = V.llava("sdpa")
    with torch.no_grad():
        plain = case.model(**case.batch, output_hidden_states=True)
        with tr.reduce(case.model, spec):
            out = case.model(**case.batch, output_hidden_states=True)
    L = case.batch["input_ids"].shape[1]
    states = torch.stack(out.hidden_states)
    assert states.shape[2] == L
    text = case.batch["input_ids"][0] != V.IMG
    text[: int((case.batch["attention_mask"][0] == 0).sum())] = False  # left padding
    # the embeddings of text tokens are those of the unreduced model, at the same positions
    assert torch.equal(out.hidden_states[0][0, text], plain.hidden_states[0][0, text])
    if spec.startswith("llm.layer.2"):  # layers before the reduction see every token
        assert torch.equal(out.hidden_states[2], plain.hidden_states[2])
    assert torch.allclose(case.model.lm_head(out.hidden_states[-1]), out.logits, atol=1e-5)
    with torch.no_grad(), tr.reduce(case.model, spec):  # return_dict=False: the same, in the tuple
        as_tuple = case.model(**case.batch, output_hidden_states=True, return_dict=False)
    every = next(v for v in as_tuple if isinstance(v, tuple) and len(v) == len(out.hidden_states))
    assert all(torch.equal(a, b) for a, b in zip(every, out.hidden_states))


@pytest.mark.parametrize("spec", ["llm.layer.2=fastv(ratio=0.5)", "projector.out=random(keep=0.5, shared=True)",
                                  "llm.layer.0=uniform(keep=0.5)"])
def test_attentions_are_realigned_to_the_input_like_the_logits(spec):
    """output_attentions=True: every layer's weights come back (B, H, L, L) at input positions:
    a dropped position neither attends nor is attended; the tower's own attentions come back too"""
    case = V.llava("eager")
    with torch.no_grad():
        plain = case.model(**case.batch, output_attentions=True)
        with tr.reduce(case.model, spec) as h:
            out = case.model(**case.batch, output_attentions=True)
            as_tuple = case.model(**case.batch, output_attentions=True, return_dict=False)
            kept = h.trace["llm.layer.2"]["pos"] if spec.startswith("llm.layer.2") else None
    real = case.batch["attention_mask"].bool()
    if kept is not None:  # the kept rows and columns hold what the unreduced model masking the rest gives
        ref = _masked_reference(case.model, case.batch, 2, kept, attentions=True)
        for j in (2, 3):
            for b in range(kept.shape[0]):
                rows = kept[b][real[b, kept[b]]]  # (a padding query attends nothing real)
                got = out.attentions[j][b][:, rows][:, :, kept[b]]
                assert torch.allclose(got, ref[j][b][:, rows][:, :, kept[b]], atol=1e-5)
    assert [tuple(a.shape) for a in out.attentions] == [tuple(a.shape) for a in plain.attentions]
    L = case.batch["input_ids"].shape[1]
    for j, a in enumerate(out.attentions):
        rows = a.sum(-1)  # (B, H, L): 1 where the position ran in layer j, 0 where it was dropped
        ran = rows[:, 0] > 0.5
        assert torch.allclose(rows[ran[:, None].expand_as(rows)], torch.ones(()), atol=1e-5)
        assert (a.sum(2)[:, 0][~ran] == 0).all()  # nobody attends a dropped position
        if spec.startswith("llm.layer.2") and j < 2:  # layers before the reduction: the unreduced weights
            assert torch.equal(a, plain.attentions[j])
            assert bool(ran[real].all())
        elif j >= 2 or not spec.startswith("llm.layer.2"):
            assert int((ran & real).sum()) < int(real.sum())
    every = next(v for v in as_tuple if isinstance(v, tuple) and len(v) == len(out.attentions))
    assert all(torch.equal(a, b) for a, b in zip(every, out.attentions))
    with torch.no_grad(), tr.reduce(case.model, spec):  # generate's prefill keeps the last logits only
        last = case.model(**case.batch, output_attentions=True, output_hidden_states=True, logits_to_keep=1)
    assert last.logits.shape[1] == 1 and torch.allclose(last.logits[:, -1], out.logits[:, -1], atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(last.attentions, out.attentions))
    assert all(h.shape[1] == L for h in last.hidden_states)
    # the vision tower's attentions, as the unreduced forward gives them
    assert len(out.image_outputs.attentions) == len(plain.image_outputs.attentions)
    if not spec.startswith("projector"):
        assert all(torch.equal(a, b) for a, b in zip(out.image_outputs.attentions, plain.image_outputs.attentions))


def test_same_input_same_output(case):
    """Invariant 6."""
    with tr.reduce(case.model, "projector.out=random(keep=0.6, seed=3); llm.layer.2=fastv(ratio=0.3)"):
        a = _logits(case.model, case.batch)
        b = _logits(case.model, case.batch)
    assert torch.equal(a, b)


def test_fastv_keeps_round_n_and_original_positions():
    """§8.7: round(n(1-R)) image tokens plus every text token; positions = original indices."""
    case = V.llava("sdpa")
    m, single = case.model, case.singles[0]
    n, L = case.visual, single["input_ids"].shape[1]
    seen = {}
    layer3 = m.model.language_model.layers[3]
    for R in (0.5, 0.75):
        with tr.reduce(m, f"llm.layer.2=fastv(ratio={R})") as h:
            hook = layer3.register_forward_pre_hook(
                lambda mod, a, kw: seen.__setitem__("pos", kw["position_ids"]), with_kwargs=True)
            _logits(m, single)
            hook.remove()
            kept = h.trace["llm.layer.2"]["pos"][0]
        is_img = single["input_ids"][0] == V.IMG
        assert int(is_img[kept].sum()) == round(n * (1 - R))
        assert int((~is_img[kept]).sum()) == int((~is_img).sum())          # all text kept
        assert torch.equal(seen["pos"][0], kept)                              # original positions
        assert kept.shape[0] == L - (n - round(n * (1 - R)))


def test_fastv_least_attended_control_keeps_the_complement():
    """attended='least' keeps the lowest-ranked image tokens: at R=0.5 its kept image tokens and
    FastV's are disjoint and together cover every image token (same attention row)."""
    case = V.llava("sdpa")
    m, single = case.model, case.singles[0]
    is_img = single["input_ids"][0] == V.IMG
    kept = {}
    for att in ("most", "least"):
        with tr.reduce(m, f"llm.layer.2=fastv(ratio=0.5, attended='{att}')") as h:
            _logits(m, single)
            pos = h.trace["llm.layer.2"]["pos"][0]
        kept[att] = set(pos[is_img[pos]].tolist())
    n = int(is_img.sum())
    assert len(kept["most"]) == len(kept["least"]) == n // 2
    assert not kept["most"] & kept["least"]
    with pytest.raises(PolicyError, match="most"):
        tr.reduce(m, "llm.layer.2=fastv(attended='top')")


def test_vision_sites_on_llava15():
    """VTC-CLS at vision.out scores with the tower's CLS rows; ToMe inside the tower; both
    shorten the prompt and generate works."""
    case = V.llava("sdpa")
    with tr.reduce(case.model, "vision.block.*=tome(r=1); vision.out=vtc_cls(keep=6, start=0)") as h:
        g = _generate(case.model, case.batch)
        st = h.stats
    assert st["sites"]["vision.out"]["tokens_out"] == 6
    assert st["llm_input_tokens"] < case.batch["attention_mask"].sum(1).float().mean()
    assert g.sequences.shape[1] == case.batch["input_ids"].shape[1] + NEW
    assert 0 < st["flops_fraction"] < 1


def test_flops_fraction_counts_the_tower_only_when_reduced_inside_it():
    """the same LLM input from vision.out or projector.out is the same fraction (the tower's FLOPs,
    unchanged by both, are left out); sites inside the tower add the tower to both totals"""
    case = V.llava("sdpa")
    stats = {}
    for spec in ("projector.out=random(keep=8, shared=True)", "vision.out=random(keep=8, shared=True)",
                 "vision.block.*=tome(r=1)"):
        with tr.reduce(case.model, spec) as h, torch.no_grad():
            case.model(**case.batch)
            stats[spec.split("=")[0]] = h.stats
    a, b, c = stats["projector.out"], stats["vision.out"], stats["vision.block.*"]
    assert a["llm_input_tokens"] == b["llm_input_tokens"]
    assert a["flops_unreduced"] == b["flops_unreduced"] and a["flops_fraction"] == pytest.approx(b["flops_fraction"])
    assert c["flops_unreduced"] > a["flops_unreduced"]


def test_return_dict_false_logits_cover_the_input(case):
    """a shortened prompt's logits are scattered back to the input's length in tuple outputs too"""
    with tr.reduce(case.model, "projector.out=random(keep=0.5, shared=True); llm.layer.2=fastv(ratio=0.5)"), \
            torch.no_grad():
        as_dict = case.model(**case.batch).logits
        as_tuple = case.model(**case.batch, return_dict=False)[0]
    assert as_tuple.shape == as_dict.shape and as_dict.shape[1] == case.batch["input_ids"].shape[1]
    assert torch.equal(as_tuple, as_dict)


def test_frames_site_on_video_models():
    for build in (V.llava_onevision, V.llava_next_video):
        case = build("sdpa")
        with tr.reduce(case.model, "frames=drop_last_test(n=2)") as h:
            g = _generate(case.model, case.batch)
            assert h.stats["sites"]["frames"]["tokens_out"] == 2
            assert h.stats["llm_input_tokens"] < case.batch["attention_mask"].sum(1).float().mean()
        assert g.sequences.shape[1] == case.batch["input_ids"].shape[1] + NEW


def test_unsupported_site_is_refused():
    case = V.llava_onevision("sdpa")
    from tokenreduce.errors import SiteError
    with pytest.raises(SiteError, match=r"unknown site 'vision.out'; valid sites: llm.layer.\{0..3\}, frames, projector.out"):
        tr.reduce(case.model, "vision.out=random(keep=4)")
    with pytest.raises(SiteError, match="fastv cannot run at site 'projector.out'"):
        tr.reduce(case.model, "projector.out=fastv(ratio=0.5)")


def test_uniform_in_the_llm_keeps_the_lattice_it_keeps_before_it():
    """the LLM sites know the image grid: uniform(keep=4) on a 4x4 grid keeps the same 2x2 lattice
    at llm.layer.K as at projector.out (not evenly spaced indices, a diagonal)"""
    case = V.llava("sdpa")
    single = case.singles[0]
    is_img = single["input_ids"][0] == V.IMG
    first = int(is_img.nonzero()[0])
    kept = {}
    for site in ("projector.out", "llm.layer.0", "llm.layer.2"):
        with tr.reduce(case.model, f"{site}=uniform(keep=4)") as h, torch.no_grad():
            case.model(**single)
            pos = h.trace[site]["pos"][0].tolist()
        kept[site] = sorted(pos) if site == "projector.out" else sorted(p - first for p in pos if is_img[p])
    assert kept["projector.out"] == kept["llm.layer.0"] == kept["llm.layer.2"] == [0, 2, 8, 10]


def test_several_new_tokens_on_a_shortened_prompt():
    """prompt-lookup candidates (several tokens per step) continue a shortened prompt correctly;
    generate(past_key_values=<an earlier turn's cache>) would re-feed old tokens (it slices by the
    shortened cache's length) and is refused with what to do instead"""
    case = V.llava("sdpa")
    m, single = case.model, case.singles[0]
    with tr.reduce(m, "projector.out=random(keep=0.5, shared=True)"):
        greedy = _generate(m, single)
        lookup = _generate(m, single, prompt_lookup_num_tokens=3)
        assert torch.equal(greedy.sequences, lookup.sequences)
        ids = torch.cat([greedy.sequences, torch.tensor([[9, 10, 11]])], 1)
        with pytest.raises(tr.SiteError, match="continuing a conversation by passing an earlier turn's past_key_values"):
            m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=greedy.past_key_values,
                       max_new_tokens=2, do_sample=False)


def test_a_conversation_continued_on_a_cache_shortened_at_llm_layer_0_is_refused():
    """after a reduction at llm.layer.0 the first layer's cache is shorter than the prompt, so
    generate(past_key_values=<the earlier turn's cache>) would re-feed old tokens: refused;
    prompt-lookup candidates on the same cache still run (and match greedy decoding)"""
    case = V.llava("sdpa")
    m, single = case.model, case.singles[0]
    with tr.reduce(m, "llm.layer.0=uniform(keep=0.5)"):
        greedy = _generate(m, single)
        assert greedy.past_key_values.get_seq_length(0) < single["input_ids"].shape[1]
        assert torch.equal(_generate(m, single, prompt_lookup_num_tokens=3).sequences, greedy.sequences)
        ids = torch.cat([greedy.sequences, torch.tensor([[9, 10, 11]])], 1)
        with pytest.raises(tr.SiteError, match="tokens away from where the reduced prompt's cache ends.*llm.layer.0"):
            m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=greedy.past_key_values,
                       max_new_tokens=2, do_sample=False)


def test_decode_steps_follow_their_cache_not_the_thread():
    """the state of a prefill goes with the KV cache it filled: a decode step run on another
    thread continues it, and a new one-token prompt after a reduced generate() starts afresh"""
    from concurrent.futures import ThreadPoolExecutor
    case = V.llava("sdpa")
    m, batch = case.model, case.batch
    for spec in ("llm.layer.2=fastv(ratio=0.5)", "projector.out=random(keep=0.5, shared=True)",
                 "llm.layer.0=uniform(keep=0.5)"):
        with torch.no_grad(), tr.reduce(m, spec):
            out = m(**batch, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            step = dict(input_ids=nxt, attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(nxt)], 1))
            here = m(**step, cache=copy_cache(out.cache)).logits
            with ThreadPoolExecutor(1) as pool:
                there = pool.submit(lambda: m(**step, cache=out.cache).logits).result()
            assert torch.equal(here, there), spec
            one = dict(input_ids=torch.tensor([[5]]), attention_mask=torch.ones(1, 1, dtype=torch.long))
            assert m.generate(**one, max_new_tokens=2, do_sample=False).shape == (1, 3)
            # features reduced on this thread, given to a forward on another
            feats = m.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
            text = {k: v for k, v in batch.items() if k != "pixel_values"}
            with ThreadPoolExecutor(1) as pool:
                there = pool.submit(lambda: m(**text, mm_encoder_outputs={"image": feats}).logits).result()
            assert torch.allclose(there, out.logits, atol=1e-5), spec


def copy_cache(cache):
    import copy
    return copy.deepcopy(cache)


@pytest.mark.parametrize("spec", ["projector.out=uniform(keep=0.5)", "llm.layer.2=fastv(ratio=0.5)"])
def test_chunked_prefill_is_refused_with_what_to_do(spec):
    """generate(prefill_chunk_size=...) would reduce each chunk alone (and slice the features by
    the unreduced placeholder count): refused by name; without it generate runs"""
    case = V.llava_onevision("sdpa")
    with tr.reduce(case.model, spec):
        with pytest.raises(tr.SiteError, match=r"prefill_chunk_size=8.*pass prefill_chunk_size=None"):
            case.model.generate(**case.singles[0], max_new_tokens=2, do_sample=False, prefill_chunk_size=8)
        from transformers import GenerationConfig
        gc = GenerationConfig(prefill_chunk_size=8, max_new_tokens=2, do_sample=False)
        rest = {k: v for k, v in case.singles[0].items() if k != "input_ids"}
        with pytest.raises(tr.SiteError, match=r"prefill_chunk_size=8"):  # the config given by position
            case.model.generate(case.singles[0]["input_ids"], gc, **rest)
        assert case.model.generate(**case.singles[0], max_new_tokens=2, do_sample=False).shape[1] > 2
    assert "generate" not in vars(case.model)
    assert case.model.generate(**case.singles[0], max_new_tokens=2, do_sample=False, prefill_chunk_size=8).shape[1] > 2


def test_fixed_size_caches_and_flex_attention_are_refused_with_what_to_do():
    """a static cache and flex attention in the LLM cannot follow tokens removed inside it: both
    said nothing useful before (a KeyError on a signal, torch's block-mask length error)"""
    case = V.BUILDERS["llava_onevision"]("sdpa")
    with tr.reduce(case.model, "llm.layer.2=fastv(ratio=0.5)"):
        with pytest.raises(tr.SiteError, match="fixed-size cache.*cannot follow the tokens a reduction removes; use the default dynamic cache"):
            case.model.generate(**case.batch, max_new_tokens=2, do_sample=False, cache_implementation="static")
        case.model.generate(**case.batch, max_new_tokens=2, do_sample=False)  # the dynamic cache works
    # changed after reduce(): said at the next forward, and remove() keeps the user's choice
    h = tr.reduce(case.model, "llm.layer.2=fastv(ratio=0.5)")
    case.model.set_attn_implementation("eager")
    with pytest.raises(tr.SiteError, match="attention implementation changed after reduce\\(\\) \\(it is now 'eager'\\)"):
        case.model(**case.batch)
    h.remove()
    assert case.model.model.language_model.config._attn_implementation == "eager"
    case.model.model.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(tr.SiteError, match="need attn_implementation 'sdpa' or 'eager' in the LLM; it uses 'flex_attention'"):
        tr.reduce(case.model, "llm.layer.2=fastv(ratio=0.5)")
    tr.reduce(case.model, "projector.out=random(keep=0.5)").remove()  # no LLM site: allowed


def test_a_standalone_feature_call_does_not_join_the_next_forwards_stats():
    case = V.llava("sdpa")
    m = case.model
    with tr.reduce(m, "vision.out=vtc_cls(keep=6); llm.layer.2=fastv(ratio=0.5)") as h, torch.no_grad():
        m(**case.batch)
        want = h.stats["sites"]["vision.out"]
        m.model.get_image_features(pixel_values=case.batch["pixel_values"][:1])  # e.g. embeddings for retrieval
        m(**case.batch)
        got = h.stats["sites"]["vision.out"]
        assert got["calls"] == 1 and got["tokens_in"] == want["tokens_in"] and got["tokens_out"] == want["tokens_out"]
        _generate(m, case.batch)  # generate() computes the features before its prefill: still one record
        assert h.stats["sites"]["vision.out"]["calls"] == 1 and h.stats["sites"]["llm.layer.2"]["calls"] == 1


@pytest.mark.parametrize("name,spec", [
    ("llava_onevision", "frames=keep_all_test; projector.out=uniform(keep=0.75); llm.layer.2=fastv(ratio=0.5)"),
    ("llava", "vision.block.1=tome(r=2); llm.layer.1=fastv(ratio=0.5)")])
def test_two_threads_can_run_one_reduced_vlm(name, spec):
    """a forward's bookkeeping (shortened prompt, LLM session, features) is per thread: two threads
    calling forward() and generate() on one reduced VLM at once get what each gets alone"""
    case = V.BUILDERS[name]("sdpa")
    inputs = [case.batch, case.singles[1]]
    with tr.reduce(case.model, spec):
        want = [_logits(case.model, x) for x in inputs]
        assert failures_in_threads(lambda x: _logits(case.model, x), inputs, want, torch.equal) == []
        want = [_generate(case.model, x).sequences for x in inputs]
        assert failures_in_threads(lambda x: _generate(case.model, x).sequences, inputs, want, torch.equal,
                                   reps=4) == []


def test_two_models_on_one_config_object_keep_their_reductions_when_one_is_removed():
    """transformers does not copy a config passed to a model: two models built from one config
    share it, and removing one's reduction put the config's attention back under the other"""
    import transformers as tf
    c = V.llava()
    torch.manual_seed(0)
    other = tf.LlavaForConditionalGeneration(c.model.config).eval()
    cfg = other.model.language_model.config
    assert c.model.model.language_model.config is cfg and cfg._attn_implementation == "sdpa"
    h1 = tr.reduce(c.model, "llm.layer.2=fastv(ratio=0.5)")
    h2 = tr.reduce(other, "llm.layer.2=fastv(ratio=0.5)")
    with torch.no_grad():
        want = other(**c.batch).logits
        h1.remove()
        assert torch.equal(other(**c.batch).logits, want)
        assert h2.stats["sites"]["llm.layer.2"]["tokens_out"] < h2.stats["sites"]["llm.layer.2"]["tokens_in"]
    h2.remove()
    assert cfg._attn_implementation == "sdpa"


def test_sliding_window_layers_after_a_reduction_see_what_the_masked_model_sees():
    """Gemma 3's sliding-window layers (window 6, prompts of 13-16 tokens): after FastV at
    llm.layer.1, prefill and every decode step equal the unreduced model with the dropped keys
    masked out in layers >= 1. The sliding cache holds its last 5 tokens counted after the
    reduction, and the window is counted in input positions; a mask over every kept key failed
    with a size mismatch at the first decode step."""
    case = V.gemma3("sdpa")
    m, K, steps = case.model, 1, 6
    layers = m.model.language_model.layers
    with tr.reduce(m, f"llm.layer.{K}=fastv(ratio=0.5)") as h:
        got = _generate(m, case.batch, new=steps, min_new_tokens=steps)
        kept = h.trace[f"llm.layer.{K}"]["pos"]
    B, L = case.batch["input_ids"].shape
    dropped = torch.ones(B, L + steps, dtype=torch.bool)
    dropped[:, L:] = False
    dropped[:, :L].scatter_(1, kept, False)

    def hook(j):
        def mask_dropped(module, args, kwargs):
            am, cache = kwargs["attention_mask"], kwargs.get("cache")
            q, kv = am.shape[-2], am.shape[-1]
            end = (cache.layers[j].get_seq_length() if cache is not None and cache.layers[j].is_initialized else 0) + q
            gone = dropped[:, end - kv:end]  # the keys the layer sees: the last kv input positions
            kwargs["attention_mask"] = am & ~gone[:, None, None, :] if am.dtype == torch.bool else \
                am.masked_fill(gone[:, None, None, :], torch.finfo(am.dtype).min)
            return args, kwargs
        return mask_dropped
    hooks = [layers[j].register_forward_pre_hook(hook(j), with_kwargs=True) for j in range(K, len(layers))]
    try:
        want = _generate(m, case.batch, new=steps, min_new_tokens=steps)
    finally:
        for x in hooks:
            x.remove()
    assert got.sequences.shape[1] == L + steps > 2 * 6  # well past the window
    assert torch.equal(got.sequences, want.sequences)
    for t in range(steps):
        assert torch.allclose(got.scores[t], want.scores[t], atol=1e-5), t


@pytest.mark.parametrize("spec", ["projector.out=dycoke_ttm", "projector.out=uniform(keep=4)"])
def test_projector_out_items_of_one_count_but_other_grids_keep_their_own_grid(spec):
    """Qwen2.5-VL videos of 2x4x8 and 4x4x4 patches: 16 tokens each (2 frames of 2x4, 4 frames of
    2x2). They ran as one group under the first video's grid, so the second kept other tokens
    (dycoke_ttm: 10 instead of 7) than alone"""
    case = V.qwen2_5_vl("sdpa")
    grids = [[2, 4, 8], [4, 4, 4]]
    pix = [torch.randn(64, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    secs = torch.tensor([1.0, 1.0])
    rows = [[5, 6, 20] + [V.VID] * 16 + [21, 8, 9], [5, 20] + [V.VID] * 16 + [21, 8, 9, 10]]
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    batch = dict(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values_videos=torch.cat(pix),
                 video_grid_thw=torch.tensor(grids), second_per_grid_ts=secs,
                 mm_token_type_ids=(ids == V.VID).long() * 2)
    singles = [dict(input_ids=torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long),
                    pixel_values_videos=p, video_grid_thw=torch.tensor([g]), second_per_grid_ts=secs[i:i + 1],
                    mm_token_type_ids=(torch.tensor([r]) == V.VID).long() * 2)
               for i, (r, p, g) in enumerate(zip(rows, pix, grids))]
    def kept(trace):
        t = trace["projector.out"]
        return t["valid"].sum(1).tolist() if t["valid"] is not None else [t["pos"].shape[1]] * t["pos"].shape[0]
    with torch.no_grad(), tr.reduce(case.model, spec) as h:
        together = case.model(**batch).logits[:, -1]
        counts = kept(h.trace)
        alone, alone_counts = [], []
        for s in singles:
            alone.append(case.model(**s).logits[0, -1])
            alone_counts += kept(h.trace)
    assert counts == alone_counts
    for b in range(2):
        assert torch.allclose(together[b], alone[b], atol=1e-5), b


@pytest.mark.parametrize("name", ["llava", "internvl", "mistral3", "paligemma"])
def test_generate_continues_a_shortened_prompt_at_the_models_own_positions(name):
    """after projector.out shortened the prompt, generate's second step equals one reduced forward
    over the prompt and the first new token: the prefill re-index starts where the model counts
    from (PaliGemma from 1: it restarted at 0 and skipped a position before the first new token)"""
    case = V.BUILDERS[name]("sdpa")
    single = case.singles[1]
    with torch.no_grad(), tr.reduce(case.model, "projector.out=uniform(keep=2)"):
        g = _generate(case.model, single, new=2)
        longer = {k: torch.cat([v, g.sequences[:, -2:-1] if k == "input_ids" else v[:, -1:].clone().fill_(
                     1 if k == "attention_mask" or name == "paligemma" else 0)], 1)
                  if torch.is_tensor(v) and v.dim() == 2 and v.shape == single["input_ids"].shape else v
                  for k, v in single.items()}
        forward = case.model(**longer).logits[0, -1]
    assert torch.allclose(g.scores[1][0], forward, atol=1e-5), (g.scores[1][0] - forward).abs().max()


def test_sliding_window_layers_before_a_ragged_plan_keep_decoding():
    """Aya Vision (sliding window 6 in layers 0-2): uniform at layer 1 keeps the same count in every
    row, ATP at layer 3 (a full-attention layer) does not. Layers 1 and 2 hold no padding slots, so
    decoding past their window goes on (it was refused for the whole model once any plan was ragged)"""
    case = V.aya_vision("sdpa")
    with tr.reduce(case.model, "llm.layer.1=uniform(keep=3); llm.layer.3=atp"):
        g = _generate(case.model, case.batch, new=6, min_new_tokens=6)
        singles = [_generate(case.model, s, new=6, min_new_tokens=6) for s in case.singles]
    assert g.sequences.shape[1] == case.batch["input_ids"].shape[1] + 6
    for b, single in enumerate(singles):
        for t in range(6):
            assert torch.allclose(g.scores[t][b], single.scores[t][0], atol=1e-4), (b, t)


def _llava_with_a_pixtral_tower():
    """pixtral-12b's layout: a Llava class around a Pixtral tower (no patch merger)"""
    import transformers as tf
    torch.manual_seed(0)
    vision = tf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=112, patch_size=14, head_dim=8)
    text = tf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128, pad_token_id=V.PAD)
    cfg = tf.LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=V.IMG,
                         vision_feature_layer=-1, vision_feature_select_strategy="full")
    return tf.LlavaForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("name, size", [("mistral3", (56, 224)), ("llava_pixtral", (28, 112))])
def test_pixtral_images_of_other_aspect_ratios_are_not_taken_for_square_grids(name, size):
    """a 2x8-token image (Mistral 3: 56x224 with its 2x2 merger; Llava + Pixtral: 28x112): its 16
    tokens were read as a 4x4 grid, so uniform(keep=4) kept tokens 0, 2, 8, 10: all in the left
    quarter of the image. Without a grid it spreads over the whole sequence."""
    model = V.mistral3("sdpa").model if name == "mistral3" else _llava_with_a_pixtral_tower()
    run = [V.IMG] * 8 + [30] + [V.IMG] * 8 + [31]  # rows of [IMG] ended by [IMG_BREAK] / [IMG_END]
    ids = torch.tensor([[5, 6] + run + [8, 9]])
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                 pixel_values=torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)),
                 image_sizes=torch.tensor([list(size)]))
    with torch.no_grad(), tr.reduce(model, "projector.out=uniform(keep=4)") as h:
        model(**batch)
        kept = h.trace["projector.out"]["pos"][0].tolist()
    assert len(kept) == 4 and any(p % 8 >= 4 for p in kept), kept  # the right half of the image is reached


@tr.register_reducer
@dataclasses.dataclass
class RecordGrid(tr.Reducer):
    """Test reducer: records each stream's grid and patch numbers, changes nothing."""
    name = "record_grid_test"
    summary = "test only"
    site_families = ("projector.out", "llm.layer")
    seen: list = dataclasses.field(default_factory=list)

    def plan(self, stream):
        self.seen.append((stream.site, stream.grid, stream.patch[0].tolist()))
        return None


@pytest.mark.parametrize("name, size, grid", [("mistral3", (56, 224), (1, 2, 8)), ("mistral3", (84, 56), (1, 3, 2)),
                                              ("llava_pixtral", (28, 112), (1, 2, 8))])
def test_pixtral_images_get_their_own_grid_from_image_sizes(name, size, grid):
    """a Pixtral tower keeps each image's aspect ratio, so its tokens' grid comes from the
    image_sizes of the call (one token per 14 x 2 pixels with Mistral 3's 2x2 merger, per 14
    in a Llava class), row-major with an [IMG_BREAK] text token after each row. The streams at
    projector.out and in the LLM carry it (they had none), and uniform keeps the lattice picks
    of that grid, as on every other gridded image."""
    from tokenreduce.reducers.uniform import _full_grid_choice
    model = V.mistral3("sdpa").model if name == "mistral3" else _llava_with_a_pixtral_tower()
    _, rows, cols = grid
    run = []
    for _ in range(rows):
        run += [V.IMG] * cols + [30]  # each row ended by [IMG_BREAK]
    ids = torch.tensor([[5, 6] + run + [8, 9]])
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                 pixel_values=torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)),
                 image_sizes=torch.tensor([list(size)]))
    spy = RecordGrid()
    policy = tr.Policy([tr.Stage("projector.out", spy), tr.Stage("llm.layer.1", spy)])
    with torch.no_grad(), tr.reduce(model, policy):
        model(**batch)
    (site0, grid0, patch0), (site1, grid1, patch1) = spy.seen
    assert (site0, grid0, patch0) == ("projector.out", grid, list(range(rows * cols)))
    in_llm = [p for p in patch1 if p >= 0]
    assert (site1, grid1, in_llm) == ("llm.layer.1", grid, list(range(rows * cols)))
    k = rows * cols // 2
    with torch.no_grad(), tr.reduce(model, f"projector.out=uniform(keep={k})") as h:
        model(**batch)
    assert h.trace["projector.out"]["pos"][0].tolist() == sorted(_full_grid_choice(rows, cols, k).tolist())


def test_gradient_checkpointing_in_the_llm_is_refused_with_llm_sites():
    """HF checkpointing re-runs each decoder layer in backward, where the llm.layer hooks see the
    tokens of the end of the forward (backward failed with a size mismatch inside the attention
    capture); a reduction before the LLM trains with it as usual"""
    case = V.llava("sdpa")
    m = case.model
    m.activation_checkpointing_enable()
    m.train()
    inputs = dict(case.singles[0], labels=case.singles[0]["input_ids"])
    try:
        with tr.reduce(m, "llm.layer.2=fastv(ratio=0.5)"):
            with pytest.raises(tr.SiteError, match="gradient checkpointing is on in the LLM"):
                m(**inputs)
        with tr.reduce(m, "projector.out=uniform(keep=0.5)"):
            m(**inputs).loss.backward()
            assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
    finally:
        m.activation_checkpointing_disable()
        m.eval()


@tr.register_reducer
@dataclasses.dataclass
class DropPositions(tr.Reducer):
    """Test reducer: drop the tokens at the given original positions."""
    name = "drop_positions_test"
    summary = "test only"
    positions: tuple = ()

    def plan(self, stream):
        return tr.Plan.from_mask(~torch.isin(stream.pos, torch.tensor(self.positions, dtype=stream.pos.dtype)))


@pytest.mark.parametrize("name", ["llava", "internvl"])
@pytest.mark.parametrize("before", ["", "late_first"])
def test_uniform_in_the_llm_spreads_over_every_image_of_a_prompt(name, before):
    """two images in one prompt (or InternVL's tiles): each is its own frame 0 with patches 0..N-1.
    Read as one frame with repeated patch numbers, uniform kept the first image whole and none of
    the second; told apart by patch numbers starting again, they merged once an earlier stage
    left the first image's early patches and the second's late ones"""
    case = V.BUILDERS[name]("sdpa")
    n = case.visual
    ids = torch.tensor([[5, 6] + [V.IMG] * n + [8] + [V.IMG] * n + [9, 10]])
    pix = case.batch["pixel_values"][:2]
    first, second = list(range(2, 2 + n)), list(range(3 + n, 3 + 2 * n))
    spec, k = "llm.layer.1=uniform(keep=0.5)", n // 2
    if before:  # the first image keeps its first 3/4, the second its last quarter
        drop = first[3 * n // 4:] + second[:3 * n // 4]
        spec, k = f"llm.layer.1=drop_positions_test(positions={tuple(drop)}); llm.layer.2=uniform(keep=2)", 1
    with torch.no_grad(), tr.reduce(case.model, spec) as h:
        case.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix)
        kept = set(h.trace[spec.rsplit(";", 1)[-1].strip().split("=")[0]]["pos"][0].tolist())
    assert len(kept & set(first)) == len(kept & set(second)) == k, sorted(kept)


@tr.register_reducer
@dataclasses.dataclass
class MergeFirstVisualPair(tr.Reducer):
    """Test reducer: fold each row's second visual token into its first (equal weights)."""
    name = "merge_first_visual_pair_test"
    summary = "test only"

    def plan(self, stream):
        B, N = stream.pos.shape
        assign = torch.arange(N).expand(B, N).clone()
        keep = []
        for b in range(B):
            v0, v1 = torch.nonzero(stream.visual[b]).flatten()[:2].tolist()
            rest = [i for i in range(N) if i != v1]
            keep.append(rest)
            slot = {i: k for k, i in enumerate(rest)}
            assign[b] = torch.tensor([slot[v0] if i == v1 else slot[i] for i in range(N)])
        return tr.Plan(keep=torch.tensor(keep), assign=assign, weight=torch.ones(B, N))


def test_qwen3_vl_deepstack_features_follow_the_tokens_kept():
    """Qwen3-VL adds one DeepStack feature per visual token after decoder layers 0-2: at projector.out
    they are cut to the same survivors, in the same order, as the projector's output (they kept
    all 8, a size mismatch in the first forward); a merge cannot carry them and is refused"""
    case = V.qwen3_vl("sdpa")
    base = case.model.model
    x, grid = case.singles[0]["pixel_values"], case.singles[0]["image_grid_thw"]
    with torch.no_grad():
        full = base.get_image_features(x, grid)
        with tr.reduce(case.model, "projector.out=random(keep=0.5, shared=True)") as h:
            reduced = base.get_image_features(x, grid)
            kept = h.trace["projector.out"]["pos"][0]
    assert len(kept) == 4 and torch.equal(reduced.pooler_output[0], full.pooler_output[0][kept])
    assert len(reduced.deepstack_features) == 3
    for level_reduced, level_full in zip(reduced.deepstack_features, full.deepstack_features):
        assert torch.equal(level_reduced[0], level_full[0][kept])
    with tr.reduce(case.model, "projector.out=merge_first_visual_pair_test"), torch.no_grad():
        with pytest.raises(tr.SiteError, match="cannot carry Qwen3-VL's DeepStack"):
            case.model(**case.singles[0])


def test_qwen3_vl_deepstack_after_a_reduction_in_a_batch_whose_other_row_keeps_everything():
    """an image row and a longer text-only row: the plan at llm.layer.1 keeps the batch width (the
    text row keeps all its tokens), which read as "nothing changed" added the image row's DeepStack
    features at its old columns (logits 0.5 off the row run alone)"""
    case = V.qwen3_vl("sdpa")
    row_a = [5, 6, 20] + [V.IMG] * 8 + [21] + [8, 9, 10]
    row_b = list(range(5, 20))  # text only, longer
    ids, mask = V._pad_rows([row_a, row_b])
    types, _ = V._pad_rows([[int(t == V.IMG) for t in r] for r in (row_a, row_b)])
    pixels = dict(pixel_values=case.singles[0]["pixel_values"], image_grid_thw=case.singles[0]["image_grid_thw"])
    batch = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, **pixels)
    single = dict(input_ids=torch.tensor([row_a]), attention_mask=torch.ones(1, len(row_a), dtype=torch.long),
                  mm_token_type_ids=types[:1, -len(row_a):], **pixels)
    with torch.no_grad(), tr.reduce(case.model, "llm.layer.1=uniform(keep=0.5)"):
        together = case.model(**batch).logits[0, -len(row_a):]
        alone = case.model(**single).logits[0]
    assert torch.allclose(together, alone, atol=1e-5), (together - alone).abs().max()


def test_qwen3_vl_deepstack_feature_of_a_merged_token_is_its_members_mean():
    """a token merged before a DeepStack layer holds two input tokens: it gets the mean of their
    DeepStack features (as if the merge came after the add; it got its anchor's alone), the other
    visual tokens their own"""
    case = V.qwen3_vl("sdpa")
    single = case.singles[0]
    text = case.model.model.language_model
    with torch.no_grad():
        full = case.model.model.get_image_features(single["pixel_values"], single["image_grid_thw"]).deepstack_features
    seen = []
    original = text._deepstack_process

    def record(hidden, mask, embeds):
        seen.append((mask.clone(), embeds.clone()))
        return original(hidden, mask, embeds)
    text._deepstack_process = record  # on this instance, under the reduction's own wrap
    try:
        with torch.no_grad(), tr.reduce(case.model, "llm.layer.1=merge_first_visual_pair_test"):
            case.model(**single)
    finally:
        del text._deepstack_process
    # levels 0, 1, 2 after layers 0, 1, 2: level 0 ran before the merge, levels 1 and 2 after it
    assert [int(m.sum()) for m, _ in seen] == [8, 7, 7]
    for level in (1, 2):
        want = torch.cat([((full[level][0][0] + full[level][0][1]) / 2)[None], full[level][0][2:]])
        assert torch.allclose(seen[level][1], want, atol=1e-6), level


@pytest.mark.parametrize("spec", ["projector.out=uniform(keep=0.5)", "llm.layer.1=fastv(ratio=0.5)"])
def test_qwen2_5_vl_images_of_two_sizes_in_a_batch(spec):
    """Qwen2.5-VL on images (the builder's case is video): a 4x8-patch and a 4x4-patch image, each
    row reduced in the batch as alone"""
    case = V.qwen2_5_vl("sdpa")
    grid = torch.tensor([[1, 4, 8], [1, 4, 4]])
    pix = [torch.randn(n, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(i)) for i, n in enumerate((32, 16))]
    rows = [[5, 6, 20] + [V.IMG] * 8 + [21, 8, 9, 10, 11], [5, 20] + [V.IMG] * 4 + [21, 8, 9]]
    L = max(map(len, rows))
    ids = torch.tensor([[V.PAD] * (L - len(r)) + r for r in rows])
    batch = dict(input_ids=ids, attention_mask=(ids != V.PAD).long(), pixel_values=torch.cat(pix), image_grid_thw=grid,
                 mm_token_type_ids=(ids == V.IMG).long())
    singles = [dict(input_ids=torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long), pixel_values=p,
                    image_grid_thw=grid[i:i + 1], mm_token_type_ids=(torch.tensor([r]) == V.IMG).long())
               for i, (r, p) in enumerate(zip(rows, pix))]
    with torch.no_grad(), tr.reduce(case.model, spec) as h:
        together = case.model(**batch).logits[:, -1]
        site = h.stats["sites"][spec.split("=")[0]]
        alone = torch.stack([case.model(**s).logits[0, -1] for s in singles])
    assert site["tokens_out"] < site["tokens_in"]
    assert torch.allclose(together, alone, atol=1e-5), (together - alone).abs().max()


# operators that read a tensor's value back to the host: each one a device sync on a GPU
HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
              "aten.equal.default", "aten.item.default"}
# operators that launch no kernel (views): left out when counting what the host issues
VIEWS = ("view", "slice", "unsqueeze", "expand", "transpose", "reshape", "select", "t.", "detach", "alias",
         "permute", "squeeze", "_unsafe_view", "split", "unbind", "as_strided")


def _is_compute(name):
    return not any(name.startswith("aten." + v) for v in VIEWS)


def _count_ops(which, run):
    """the operators run() dispatches that which(name) picks, under no_grad"""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += bool(which(str(func)))
            return func(*args, **(kwargs or {}))
    with torch.no_grad(), Count():
        run()
    return Count.n


def _ops_per_decode_step(model, inputs, which):
    """operators of one greedy decode step: generating 6 tokens against generating 2"""
    def generate(n):
        return lambda: model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return (_count_ops(which, generate(6)) - _count_ops(which, generate(2))) / 4


@pytest.mark.parametrize("name", ["llava_onevision", "qwen2_vl"])
@pytest.mark.parametrize("spec", ["projector.out=random(keep=0.5)", "llm.layer.1=fastv(ratio=0.5)"])
def test_a_decode_step_of_a_reduced_vlm_reads_nothing_more_back_to_the_host(name, spec):
    """on a GPU every value read back is a sync that stalls the launch queue; a decode step of a
    reduced model reads back what the unreduced model's step does (generate's own stopping check)"""
    case = V.BUILDERS[name]("sdpa")
    single = case.singles[0]
    unreduced = _ops_per_decode_step(case.model, single, HOST_READS.__contains__)
    with tr.reduce(case.model, spec):
        reduced = _ops_per_decode_step(case.model, single, HOST_READS.__contains__)
    assert reduced == unreduced, (reduced, unreduced)


def _onevision_with_llm_layers(case, layers):
    import transformers as tf
    cfg = case.model.config
    text = {**cfg.text_config.to_dict(), "num_hidden_layers": layers, "layer_types": None}
    torch.manual_seed(0)
    model = tf.LlavaOnevisionForConditionalGeneration(tf.LlavaOnevisionConfig(
        vision_config=cfg.vision_config.to_dict(), text_config=tf.Qwen2Config(**text),
        image_token_index=cfg.image_token_index, video_token_index=cfg.video_token_index,
        vision_feature_select_strategy="full")).eval()
    model.set_attn_implementation("sdpa")
    return model


def test_a_reduced_prefill_reads_back_no_more_with_more_llm_layers():
    """statistics and signals inside the LLM read nothing back per layer (each read a device sync
    that stops the host from running ahead of a GPU): fastv's prefill on a 4- and an 8-layer
    decoder reads back the same number of values"""
    case = V.llava_onevision("sdpa")
    deeper = _onevision_with_llm_layers(case, 8)
    reads = []
    for model in (case.model, deeper):
        with tr.reduce(model, "llm.layer.1=fastv(ratio=0.5)") as h:
            reads.append(_count_ops(HOST_READS.__contains__, lambda: model(**case.batch)))
            st = h.stats  # the statistics still hold every layer's count
            L = model.config.text_config.num_hidden_layers  # layers from the first site on are counted
            assert set(st["tokens_per_layer"]) == {("llm", j) for j in range(1, L)}
            assert all(isinstance(v, float) for v in st["tokens_per_layer"].values())
            assert st["sites"]["llm.layer.1"]["tokens_out"] < st["sites"]["llm.layer.1"]["tokens_in"]
    assert reads[0] == reads[1], reads


def test_prompt_statistics_are_read_back_with_the_stats_not_in_the_forward():
    """the prompt's token counts after a reduction before the LLM stay device scalars until the
    statistics are read (two reads fewer per prefill: 16 -> 14 on this case with random)"""
    case = V.llava_onevision("sdpa")
    with tr.reduce(case.model, "projector.out=random(keep=0.3)") as h, torch.no_grad():
        case.model(**case.batch)
        extra = h.recorder.last.extra
        assert torch.is_tensor(extra["llm_input_tokens"]) and torch.is_tensor(extra["prompt_tokens"])
        st = h.stats
    L = case.batch["input_ids"].shape[1]
    assert isinstance(st["prompt_tokens"], float) and st["prompt_tokens"] == float(case.batch["attention_mask"].sum(1).float().mean())
    assert isinstance(st["llm_input_tokens"], float) and st["llm_input_tokens"] < st["prompt_tokens"] <= L
    assert 0 < st["flops_fraction"] < 1


def test_uniform_on_whole_frames_reads_back_no_more_than_random():
    """uniform at projector.out on a video (every frame whole) picks its lattice by a table
    lookup and reads back one value (whether the frames are whole): no more than random at the
    same site, where its per-frame path read several per frame and row (24 against 16)"""
    case = V.llava_onevision("sdpa")
    reads = {}
    for spec in ("projector.out=random(keep=0.3)", "projector.out=uniform(keep=0.3)"):
        with tr.reduce(case.model, spec) as h, torch.no_grad():
            case.model(**case.batch)  # the lattice of a grid and budget is computed once, then cached
            reads[spec.split("=")[1][:6]] = _count_ops(HOST_READS.__contains__, lambda: case.model(**case.batch))
            assert h.stats["sites"]["projector.out"]["tokens_out"] < h.stats["sites"]["projector.out"]["tokens_in"]
    assert reads["unifor"] <= reads["random"], reads


@pytest.mark.parametrize("spec", ["llm.layer.1=fastv(ratio=0.5)", "llm.layer.*=framefusion(cost=0.3)"])
def test_layers_after_a_reduction_launch_what_unreduced_layers_do(spec):
    """on a GPU the host issues every operator: the layers after a reduction share one gather of
    the rotary table, position ids and mask, and a finished FrameFusion plans nothing, so four more
    decoder layers add as many operators to the reduced prefill as to the unreduced one"""
    case = V.llava_onevision("sdpa")
    single = case.singles[0]
    added = {}
    for reduced in (False, True):
        ops = []
        for layers in (8, 12):
            model = _onevision_with_llm_layers(case, layers)
            if reduced:
                tr.reduce(model, spec)
            ops.append(_count_ops(_is_compute, lambda: model(**single)))
        added[reduced] = ops[1] - ops[0]
    assert added[True] <= added[False], added


def test_a_reduced_decode_step_launches_no_more_per_layer():
    """after fastv the decode steps' key masks are shared by the layers that kept the same keys:
    a reduced step runs a fixed number of operators more than an unreduced one, whatever the depth"""
    case = V.llava_onevision("sdpa")
    single = case.singles[0]
    extra = []
    for layers in (8, 12):
        model = _onevision_with_llm_layers(case, layers)
        unreduced = _ops_per_decode_step(model, single, _is_compute)
        with tr.reduce(model, "llm.layer.1=fastv(ratio=0.5)"):
            extra.append(_ops_per_decode_step(model, single, _is_compute) - unreduced)
    assert extra[0] == extra[1] and extra[0] <= 4, extra
