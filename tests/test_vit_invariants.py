"""The README's adapter invariants 1, 2, 5, 6 for every ViT adapter (timm, open_clip, HF towers)."""
import pytest
import torch

import tokenreduce as tr
from concurrency import failures_in_threads


def _policy_for(case):
    # a score-based reducer that can run on this model, in a block and at the output
    scorer = "vtc_cls" if case.has_cls else "random"
    return f"vision.block.0=tome(r=2); vision.block.1={scorer}(keep=0.6); vision.out=random(keep=0.8, seed=3)"


def test_keep_all_is_bit_identical(vit_case):
    """Invariant 1: a policy that runs every site with keep-everything plans changes nothing."""
    model = vit_case.build()
    x = vit_case.inputs()
    base = vit_case.run(model, x)
    spec = ("vision.layer.*=keep_all_test; vision.block.*=keep_all_test(merge=True); "
            "vision.block.*=tome(r=0); vision.out=keep_all_test")
    with tr.reduce(model, spec) as h:
        out = vit_case.run(model, x)
        assert h.stats["sites"]["vision.out"]["tokens_out"] == h.stats["tokens_start"]
    assert torch.equal(out, base)


def test_remove_restores_exactly(vit_case):
    """Invariant 2: after .remove() the model is bit-identical to before reduce()."""
    model = vit_case.build()
    x = vit_case.inputs()
    base = vit_case.run(model, x)
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    h = tr.reduce(model, _policy_for(vit_case))
    reduced = vit_case.run(model, x)
    assert not torch.equal(reduced, base) or reduced.shape != base.shape
    h.remove()
    assert torch.equal(vit_case.run(model, x), base)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    assert "_tokenreduce_handle" not in model.__dict__


def test_merging_conserves_size_and_positions(vit_case):
    """Invariant 5: sizes sum to the original count; survivors keep original positions;
    protected tokens stay first and in order."""
    model = vit_case.build()
    x = vit_case.inputs()
    with tr.reduce(model, "vision.block.*=tome(r=3, trace_source=True)") as h:
        vit_case.run(model, x)
        n0 = h.stats["tokens_start"]
        for site, t in h.trace.items():
            assert torch.allclose(t["size"].sum(1), torch.full((x.shape[0],), float(n0)))
            pos = t["pos"]
            assert all(len(set(p.tolist())) == pos.shape[1] for p in pos)          # no duplicates
            assert int(pos.max()) < n0
            P = vit_case.num_prefix
            assert torch.equal(pos[:, :P], torch.arange(P).expand(pos.shape[0], P))  # prefix first
            # the source matrix says which originals each token holds; rows sum to sizes
            assert torch.allclose(t["source"].sum(-1), t["size"])
            assert torch.equal(t["source"].sum(1), torch.ones(x.shape[0], n0))
        assert h.stats["tokens"][-1] < n0


def test_same_seed_same_output(vit_case):
    """Invariant 6."""
    model = vit_case.build()
    x = vit_case.inputs()
    with tr.reduce(model, _policy_for(vit_case)):
        a = vit_case.run(model, x)
        b = vit_case.run(model, x)
    assert torch.equal(a, b)
    with tr.reduce(model, "vision.block.1=random(keep=0.5, seed=1)"):
        c = vit_case.run(model, x)
    with tr.reduce(model, "vision.block.1=random(keep=0.5, seed=2)"):
        d = vit_case.run(model, x)
    assert not torch.equal(c, d)


def test_reduction_cuts_tokens_and_flops(vit_case):
    model = vit_case.build()
    x = vit_case.inputs()
    with tr.reduce(model, "vision.block.0=drop_last_test(n=3)") as h:
        out = vit_case.run(model, x)
        st = h.stats
    assert st["tokens_per_layer"][1] == st["tokens_start"] - 3
    assert 0 < st["flops_fraction"] < 1
    assert torch.isfinite(out).all()


def test_batch_rows_are_independent(vit_case):
    """Reductions are per sample: sample 0 alone gives the same result as inside a batch."""
    model = vit_case.build()
    x = vit_case.inputs(batch=3)
    with tr.reduce(model, _policy_for(vit_case).replace("random(keep=0.8, seed=3)", "uniform(keep=0.8)")):
        full = vit_case.run(model, x)
        one = vit_case.run(model, x[:1])
    assert torch.allclose(full[:1], one, atol=1e-5)


def test_reduce_twice_replaces_policy(vit_case):
    model = vit_case.build()
    x = vit_case.inputs()
    base = vit_case.run(model, x)
    tr.reduce(model, "vision.block.0=tome(r=4)")
    h2 = tr.reduce(model, "vision.block.1=tome(r=1)")
    vit_case.run(model, x)
    assert list(h2.stats["sites"]) == ["vision.block.1"]
    assert tr.unreduce(model)
    assert torch.equal(vit_case.run(model, x), base)


def test_linear_macs_counts_multihead_attention_projections():
    """open_clip's blocks use nn.MultiheadAttention: q/k/v sit in in_proj_weight (a parameter, not a
    Linear) and out_proj is a Linear, 4 C^2 multiply-adds per token in all; with kdim/vdim the
    projections are separate weights"""
    from tokenreduce.flops import linear_macs
    C = 48
    assert linear_macs(torch.nn.MultiheadAttention(C, 4)) == 4 * C * C
    assert linear_macs(torch.nn.MultiheadAttention(C, 4, kdim=16, vdim=8)) == C * C + C * 16 + C * 8 + C * C


def test_timm_forward_head_pools_what_it_is_given():
    """the size-weighted average pool replaces the pool of the forward's own merged tokens only:
    forward_head(other features) afterwards pools those features as timm does"""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, class_token=False,
                          global_pool="avg", depth=2).eval()
    other = torch.randn(2, 4, m.embed_dim)
    with torch.no_grad():
        want = m.forward_head(other)
        with tr.reduce(m, "vision.block.*=tome(r=1)"):
            m(torch.randn(2, 3, 32, 32))
            assert torch.allclose(m.forward_head(other), want, atol=1e-6)


def _expand_by_size(tokens, size):
    """each token repeated size times (ToMe sizes are whole counts): pooling these as the model
    does is what a size-weighted pool of the merged tokens must give"""
    counts = size.round().long()
    assert torch.allclose(counts.float(), size)
    return torch.stack([t.repeat_interleave(c, dim=0) for t, c in zip(tokens, counts)])


@pytest.mark.parametrize("pool, include_prefix", [("avg", False), ("avg", True), ("avgmax", False), ("map", False),
                                                   ("map", True)])
def test_timm_pools_merged_tokens_as_the_tokens_they_stand_for(pool, include_prefix):
    m = _tiny_timm(img_size=64, embed_dim=32, depth=2, num_heads=2, global_pool=pool,
                   pool_include_prefix=include_prefix)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with tr.reduce(m, "vision.block.*=tome(r=3)") as h:
            logits = m(x)
            tokens = m.forward_features(x)
            pooled = m.forward_head(tokens, pre_logits=True)
            size = h.adapter._pass.final.size
        assert tokens.shape[1] == 17 - 6
        expanded = _expand_by_size(tokens, size)
        assert torch.allclose(logits, m.forward_head(expanded), atol=1e-5)
        assert torch.allclose(pooled, m.forward_head(expanded, pre_logits=True), atol=1e-5)
        assert not torch.allclose(pooled, m.forward_head(tokens, pre_logits=True), atol=1e-3)


def test_open_clip_average_pool_weights_merged_tokens_by_size():
    pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(0)
    m = VisionTransformer(image_size=64, patch_size=16, width=64, layers=3, heads=4, mlp_ratio=4.0,
                          output_dim=32, pool_type="avg").eval()
    x = torch.randn(2, 3, 64, 64)
    seen = {}
    hook = m.transformer.register_forward_hook(lambda mod, a, out: seen.update(tokens=out))
    with torch.no_grad():
        with tr.reduce(m, "vision.block.*=tome(r=2)") as h:
            out = m(x)
            size = h.adapter._pass.final.size
        hook.remove()
        assert "_global_pool" not in vars(m)  # the per-instance wrapper is gone with the reduction
        head = lambda t: m._pool(t)[0] @ m.proj
        assert torch.allclose(out, head(_expand_by_size(seen["tokens"], size)), atol=1e-5)
        assert not torch.allclose(out, head(seen["tokens"]), atol=1e-4)


@pytest.mark.parametrize("attentional_pool", [True, "parallel", "cascade"])
def test_open_clip_attentional_pooler_counts_merged_tokens_by_size(attentional_pool):
    """CoCa's attentional pooler (and the 'parallel' contrastive one) over merged tokens is the
    pooler over the tokens repeated by their sizes; 'cascade' pools the first pooler's queries"""
    pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(0)
    # output_dim == width: open_clip's parallel / cascade poolers apply ln_post(output_dim) to the tokens
    m = VisionTransformer(image_size=64, patch_size=16, width=64, layers=3, heads=4, mlp_ratio=4.0,
                          output_dim=64, attentional_pool=attentional_pool, attn_pooler_queries=4,
                          attn_pooler_heads=4, pool_type="tok", output_tokens=True).eval()
    x = torch.randn(2, 3, 64, 64)
    seen = {}
    hook = m.transformer.register_forward_hook(lambda mod, a, out: seen.update(tokens=out))
    with torch.no_grad():
        with tr.reduce(m, "vision.block.*=tome(r=2)") as h:
            pooled, tokens = m(x)
            size = h.adapter._pass.final.size
        hook.remove()
        assert seen["tokens"].shape[1] == 17 - 6
        want_pooled, want_tokens = m._pool(_expand_by_size(seen["tokens"], size))
        plain_pooled, plain_tokens = m._pool(seen["tokens"])
    assert torch.allclose(tokens, want_tokens, atol=1e-5) and not torch.allclose(tokens, plain_tokens, atol=1e-4)
    assert torch.allclose(pooled, want_pooled @ m.proj, atol=1e-5)
    assert not torch.allclose(pooled, plain_pooled @ m.proj, atol=1e-4)


def test_siglip_pooling_head_attends_to_merged_tokens_by_size():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = tf.SiglipVisionModel(tf.SiglipVisionConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                   intermediate_size=128, image_size=32, patch_size=8)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with tr.reduce(m, "vision.block.*=tome(r=2)") as h:
            out = m(pixel_values=x)
            size = h.adapter._pass.final.size
        tokens = out.last_hidden_state
        assert tokens.shape[1] == 16 - 6
        # softmax over a token repeated k times = one token with log(k) on its logit
        assert torch.allclose(out.pooler_output, m.head(_expand_by_size(tokens, size)), atol=1e-5)
        assert not torch.allclose(out.pooler_output, m.head(tokens), atol=1e-4)


def _tiny_timm(**kw):
    """a small timm VisionTransformer (the class vit_base_patch16_224 uses), seeded"""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()


def test_timm_intermediates_refuse_a_grid_reshape_of_reduced_tokens():
    """forward_intermediates / get_intermediate_layers(reshape=True) fold the token sequence into
    the patch grid: after ToMe that scrambled tokens into channels silently; now it raises, NLC
    returns the reduced tokens, and an unreduced pass is untouched"""
    m = _tiny_timm(img_size=64, embed_dim=64, depth=3, num_heads=4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, want = m.forward_intermediates(x)
        with tr.reduce(m, "vision.block.*=tome(r=2)"):
            with pytest.raises(tr.SiteError, match="left 11 of 17; use output_fmt='NLC'"):
                m.forward_intermediates(x)
            with pytest.raises(tr.SiteError, match="reshape=True"):
                m.get_intermediate_layers(x, n=2, reshape=True)
            nlc = m.get_intermediate_layers(x, n=3)
            assert [t.shape[1] for t in nlc] == [14, 12, 10]  # 16 patches, r=2 per block
        with tr.reduce(m, "vision.out=random(keep=1.0)"):
            _, same = m.forward_intermediates(x)
        assert all(torch.equal(a, b) for a, b in zip(same, want))
        # intermediates before the reduction are whole grids: given, not refused
        with tr.reduce(m, "vision.block.2=uniform(keep=0.5)"):
            early = m.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
            with pytest.raises(tr.SiteError, match="use output_fmt='NLC'"):
                m.forward_intermediates(x, indices=[1, 2], return_prefix_tokens=True)
        assert all(torch.equal(a, b) for a, b in zip(early, want[:2]))
    assert "forward_intermediates" not in vars(m)


def test_timm_normed_intermediates_are_not_reduced_at_vision_out():
    """forward_intermediates(norm=True) runs the final norm (where vision.out sits) on every
    intermediate: those are not the encoder's output and pass through; the last block's
    intermediate and the final output are one reduction, equal to forward_features'"""
    m = _tiny_timm(img_size=64, embed_dim=64, depth=4, num_heads=4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, plain = m.forward_intermediates(x, indices=[1, 3], norm=True, output_fmt="NLC")
        last_two = m.get_intermediate_layers(x, n=2, norm=True)
        for spec in ("vision.out=vtc_cls(keep=2)", "vision.out=random(keep=0.5)"):
            with tr.reduce(m, spec) as h:
                want = m.forward_features(x)
                final, inter = m.forward_intermediates(x, indices=[1, 3], norm=True, output_fmt="NLC")
                assert torch.equal(inter[0], plain[0])  # block 1: untouched
                assert torch.equal(final, want)
                assert torch.equal(inter[1], want[:, 1:])  # the last block's, without the class token
                assert h.stats["sites"]["vision.out"]["calls"] == 1
                only = m.get_intermediate_layers(x, n=2, norm=True)
                assert torch.equal(only[0], last_two[0]) and torch.equal(only[1], want[:, 1:])


def test_open_clip_intermediates_refuse_a_grid_reshape_and_a_bypassed_vision_out():
    """open_clip's forward_intermediates reshapes to NCHW as timm's does (refused once tokens are
    gone; NLC gives them), and runs the blocks without the transformer's forward, where
    vision.out sits: a vision.out stage is refused, not silently skipped"""
    pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(0)
    m = VisionTransformer(image_size=64, patch_size=16, width=64, layers=3, heads=4, mlp_ratio=4.0,
                          output_dim=32).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with tr.reduce(m, "vision.block.1=uniform(keep=0.5)"):
            with pytest.raises(tr.SiteError, match="left 9 of 17; use output_fmt='NLC'"):
                m.forward_intermediates(x)
            nlc = m.forward_intermediates(x, output_fmt="NLC")["image_intermediates"]
            assert [t.shape[1] for t in nlc] == [16, 8, 8]
        plain = m.forward_intermediates(x, intermediates_only=True, output_fmt="NLC")["image_intermediates"]
        with tr.reduce(m, "vision.out=uniform(keep=0.25)"):
            with pytest.raises(tr.SiteError, match="vision.out sits"):
                m.forward_intermediates(x, output_fmt="NLC")
            # no final output asked for: nothing of vision.out's is missed, the blocks' tokens come back
            only = m.forward_intermediates(x, intermediates_only=True, output_fmt="NLC")["image_intermediates"]
            assert len(only) == len(plain) and all(torch.equal(a, b) for a, b in zip(only, plain))
    assert "forward_intermediates" not in vars(m)


def test_a_plan_that_keeps_no_token_is_refused_without_a_class_token():
    """with no protected token to fall back on, keep=0 used to give NaN logits silently"""
    m = _tiny_timm(img_size=32, embed_dim=32, depth=2, num_heads=2, class_token=False, global_pool="avg")
    with torch.no_grad(), tr.reduce(m, "vision.block.0=uniform(keep=0)"):
        with pytest.raises(tr.SiteError, match="vision.block.0: the plan keeps no token"):
            m(torch.randn(2, 3, 32, 32))


def test_timm_attention_mask_with_a_reduction_inside_the_blocks_is_refused():
    m = _tiny_timm(img_size=32, embed_dim=32, depth=2, num_heads=2)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 1, 5, 5)
    with torch.no_grad():
        with tr.reduce(m, "vision.block.1=uniform(keep=0.5)"):
            with pytest.raises(tr.SiteError, match="attn_mask.*not reduced with the tokens"):
                m.forward_features(x, attn_mask=mask)
        with tr.reduce(m, "vision.out=uniform(keep=0.5)"):  # after every block: the mask fits
            assert m.forward_features(x, attn_mask=mask).shape[1] == 3


def test_a_signal_before_the_first_block_names_the_first_site_that_has_it():
    m = _tiny_timm(img_size=32, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(tr.SiteError, match="vision.layer.0 comes before any block.*use vision.layer.1"):
        tr.reduce(m, "vision.layer.*=tome(r=2)")


def test_two_threads_can_run_one_reduced_vit():
    """the state of a forward is per thread: two threads calling one reduced model at once get
    what each gets alone (they used to fail on most calls)"""
    m = _tiny_timm(img_size=32, embed_dim=32, depth=3, num_heads=2)
    inputs = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad(), tr.reduce(m, "vision.block.*=tome(r=2); vision.out=vtc_cls(keep=4)"):
        want = [m(x) for x in inputs]
        assert failures_in_threads(m, inputs, want, torch.equal, reps=15) == []


def test_a_meta_device_forward_says_which_reducer_needs_values():
    """shape-only ToMe runs on meta tensors; reducers that need values say so, not torch's
    'Tensor.item() cannot be called on meta tensors'"""
    timm = pytest.importorskip("timm")
    x = torch.randn(2, 3, 64, 64, device="meta")
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2).eval()
    with tr.reduce(m, "vision.block.*=tome(r=3)"), torch.no_grad():
        assert m.to("meta")(x).shape == (2, 1000)
    # fixed budgets on a ViT's stream are counted on the host: pruning runs on meta tensors too
    for spec in ("vision.block.1=random(keep=0.5)", "vision.block.1=vtc_cls(keep=3)"):
        with tr.reduce(m, spec) as h, torch.no_grad():
            assert m(x).shape == (2, 1000) and h.stats["tokens"][-1] == 1 + {"r": 8, "v": 3}[spec[15]]
    # a model that pools the patches alone checks that a patch is left, on the host (with pruning);
    # after merging, its size-weighted pool (average or attention) decides on the device whether
    # it pools this forward's tokens
    avg = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, global_pool="avg").eval()
    with tr.reduce(avg, "vision.block.1=vtc_cls(keep=3)"), torch.no_grad():
        assert avg.to("meta")(x).shape == (2, 1000)
    for pool in ("avg", "map"):
        pooled = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, global_pool=pool)
        with tr.reduce(pooled.eval(), "vision.block.*=tome(r=3)") as h, torch.no_grad():
            assert pooled.to("meta")(x).shape == (2, 1000) and h.stats["tokens"][-1] == 17 - 6
    # uniform on whole frames is a table lookup with a host count; after another reduction it
    # reads the surviving patch indices back
    with tr.reduce(m, "vision.block.0=uniform(keep=0.5)") as h, torch.no_grad():
        assert m(x).shape == (2, 1000) and h.stats["tokens"][-1] == 1 + 8
    with tr.reduce(m, "vision.block.0=uniform(keep=0.5); vision.block.1=uniform(keep=0.5)"), torch.no_grad():
        with pytest.raises(tr.SiteError, match="vision.block.1: uniform needs concrete values .* meta device"):
            m(x)


@pytest.mark.parametrize("shared", [False, True])
def test_random_copies_its_draw_to_the_device_once(shared):
    """random draws on the CPU (the same picks on every device) and copied the draw to the
    model's device in every forward: a host-to-device copy, which a CUDA-graph capture refuses.
    The copy is now made once and kept: the second forward (on the meta device here) copies
    nothing from the host."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostCopies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.copy_):
                src = args[1] if func.overloadpacket is torch.ops.aten.copy_ else args[0]
                if src.device.type == "cpu" and out.device.type == "meta":
                    self.count += 1
            return out
    timm = pytest.importorskip("timm")
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2).eval().to("meta")
    x = torch.empty(2, 3, 64, 64, device="meta")
    spec = f"vision.block.1=random(keep=0.5, seed=12345, shared={shared})"  # a seed no other test uses
    with tr.reduce(m, spec) as h, torch.no_grad():
        copies = []
        for _ in range(2):
            with HostCopies() as mode:
                m(x)
            copies.append(mode.count)
            assert h.stats["tokens"][-1] == 1 + 8
    assert copies == [1, 0], copies


def test_timm_diff_attention_is_refused_at_reduce_time():
    m = _tiny_timm(img_size=64, embed_dim=64, depth=2, num_heads=4, attn_layer="diff")
    with pytest.raises(tr.UnsupportedModelError, match="with attention DiffAttention; tokenreduce supports"):
        tr.reduce(m, "vision.out=random(keep=0.5)")
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())


def test_apply_plan_keeps_float64():
    from tokenreduce.stream import Plan, TokenStream, apply_plan
    x = torch.randn(1, 4, 3, dtype=torch.float64)
    st = TokenStream.start(x)
    plan = Plan(keep=torch.tensor([[0, 2]]), assign=torch.tensor([[0, 0, 1, 1]]))
    out, _ = apply_plan(st, plan)
    assert out.x.dtype == torch.float64
    assert torch.equal(out.x[0, 0], (x[0, 0] + x[0, 1]) / 2) and torch.equal(out.x[0, 1], (x[0, 2] + x[0, 3]) / 2)


def test_modes_the_hooks_cannot_follow_are_refused():
    """gradient checkpointing re-runs blocks in backward; flex / flash attention cannot take the
    log(size) bias of proportional attention: both say so instead of failing deep inside"""
    transformers = pytest.importorskip("transformers")
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8)
    torch.manual_seed(0)
    m = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**cfg))
    (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
    m.train()
    with tr.reduce(m, "vision.block.*=tome(r=1)"):
        with pytest.raises(tr.SiteError, match="gradient checkpointing is on"):
            m(pixel_values=torch.randn(2, 3, 32, 32))
        with torch.no_grad():  # no backward, nothing re-run: fine
            m(pixel_values=torch.randn(2, 3, 32, 32))
    flex = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**cfg))
    flex.set_attn_implementation("flex_attention")
    with pytest.raises(tr.SiteError, match="needs attn_implementation 'sdpa' or 'eager'; this tower uses 'flex_attention'"):
        tr.reduce(flex, "vision.block.*=tome(r=1)")
    tr.reduce(flex, "vision.block.*=tome(r=1, prop_attn=False)").remove()  # no bias: allowed
    later = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**cfg))
    with tr.reduce(later, "vision.block.*=tome(r=1)"):
        later.set_attn_implementation("flex_attention")  # after reduce(): refused at the forward, not deep in torch
        with pytest.raises(tr.SiteError, match="this tower uses 'flex_attention'"), torch.no_grad():
            later(pixel_values=torch.randn(2, 3, 32, 32))


def test_a_forward_with_grad_leaves_no_graph_behind():
    """with autograd on and no backward, nothing of the forward's graph outlives its output
    (stored attention signals and the final tokens held it: ~99% of the activations)"""
    import gc
    m = _tiny_timm(img_size=32, embed_dim=32, depth=3, num_heads=2, global_pool="avg")
    x = torch.randn(2, 3, 32, 32)

    def graph_tensors():
        import warnings
        gc.collect()
        with warnings.catch_warnings():  # isinstance on every object meets torch's deprecated aliases
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None)
    before = graph_tensors()
    for spec in ("vision.block.*=tome(r=2)", "vision.block.1=vtc_cls(keep=4)", "vision.layer.2=random(keep=0.5)"):
        with tr.reduce(m, spec):
            out = m(x)
            assert out.grad_fn is not None
            del out
            assert graph_tensors() == before, spec
            out = m(x)
            out.sum().backward()  # the weighted pool after merging still passes gradients
            assert m.patch_embed.proj.weight.grad is not None
            m.zero_grad()
            del out


def test_signals_keep_their_graph_only_for_a_reducer_that_plans_with_gradients():
    """a third-party differentiable reducer at a vision site reads [CLS] attention with its
    gradient; a built-in (no_grad) one reads it detached"""
    from dataclasses import dataclass

    from tokenreduce.reducers.base import Needs, Reducer

    seen = []

    @dataclass
    class Peek(Reducer):
        name = "peek_cls_test"
        site_families = ("vision.layer",)

        def needs(self, site):
            return Needs(signals={"cls_attn": (None,)})

        def plan(self, stream):
            seen.append(stream.signal("cls_attn").requires_grad)
            return None

    @dataclass
    class PeekWithGrad(Peek):
        name = "peek_cls_grad_test"
        differentiable = True

    m = _tiny_timm(img_size=32, embed_dim=32, depth=3, num_heads=2)
    for red, want in ((Peek(), False), (PeekWithGrad(), True)):
        with tr.reduce(m, tr.Policy([tr.Stage("vision.layer.2", red)])):
            m(torch.randn(1, 3, 32, 32))
        assert seen.pop() is want


@pytest.mark.parametrize("build, spec", [
    ("timm avg", "vision.out=visionzip(dominant=1, contextual=0)"),  # the CLS takes the one dominant slot
    ("timm avgmax", "vision.block.0=uniform(keep=0)"),
    ("timm max", "vision.out=random(keep=0)"),
    ("timm reg avg", "vision.out=uniform(keep=0)"),
    ("open_clip avg", "vision.out=random(keep=0)")])
def test_a_plan_leaving_no_patch_for_a_patch_pool_is_refused(build, spec):
    """the class / register tokens remain, but these pools read the patches alone: NaN (avg) or a
    torch IndexError (avgmax, max) before; now the error says to keep a patch"""
    torch.manual_seed(0)
    if build.startswith("open_clip"):
        pytest.importorskip("open_clip")
        from open_clip.transformer import VisionTransformer
        m = VisionTransformer(image_size=64, patch_size=16, width=64, layers=2, heads=4, mlp_ratio=4.0,
                              output_dim=32, pool_type="avg").eval()
    else:
        m = _tiny_timm(img_size=64, embed_dim=32, depth=2, num_heads=2, global_pool=build.split()[-1],
                       reg_tokens=4 if "reg" in build else 0)
    x = torch.randn(2, 3, 64, 64)
    refused = pytest.raises(tr.SiteError, match="no patch token.*pools the patch.*keep at least one")
    with tr.reduce(m, spec), torch.no_grad(), refused:
        m(x)
    with tr.reduce(m, spec.replace("keep=0", "keep=1").replace("contextual=0", "contextual=1")), torch.no_grad():
        assert torch.isfinite(m(x)).all()  # one patch is enough


def test_timm_and_open_clip_checkpointing_is_refused_in_eval_mode_too():
    """timm and open_clip checkpoint whenever their flag is set (transformers only in training): with
    grad on, eval() mode re-ran the blocks in backward against the end-of-forward tokens and failed
    inside torch (a size mismatch) instead of being refused"""
    m = _tiny_timm(img_size=64, embed_dim=32, depth=2, num_heads=2)
    m.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer
    oc = VisionTransformer(image_size=64, patch_size=16, width=64, layers=2, heads=4, mlp_ratio=4.0,
                           output_dim=32).eval()
    oc.set_grad_checkpointing(True)
    for model in (m, oc):
        with tr.reduce(model, "vision.block.*=tome(r=2)"):
            assert not model.training
            with pytest.raises(tr.SiteError, match="gradient checkpointing is on"):
                model(x)
            with torch.no_grad():  # nothing re-run in a backward: fine
                model(x)


@pytest.mark.parametrize("pool", [dict(pool_type="avg", output_dim=32),
                                  dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=4,
                                       output_dim=64)])
def test_open_clip_forward_intermediates_pools_merged_tokens_as_the_forward_does(pool):
    """forward_intermediates runs the blocks without the transformer's forward (where vision.out
    sits): its image_features were pooled without the size weighting model(x) applies"""
    pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(0)
    m = VisionTransformer(image_size=64, patch_size=16, width=64, layers=3, heads=4, mlp_ratio=4.0, **pool).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), tr.reduce(m, "vision.block.*=tome(r=2)"):
        want = m(x)
        got = m.forward_intermediates(x, output_fmt="NLC")["image_features"]
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()


def test_checkpointing_in_a_whole_clip_models_text_tower_does_not_refuse_the_vision_sites():
    """the flag on open_clip's text transformer re-runs no vision block: a vision reduction with
    grad on trains as usual (it was refused once eval-mode checkpointing counted)"""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    m = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=64, patch_size=16, width=64, layers=2, head_width=16),
                       text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=4, layers=1)).eval()
    m.transformer.grad_checkpointing = True  # the text tower only
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    with tr.reduce(m, "vision.block.*=tome(r=2)"):
        m.encode_image(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    m.visual.set_grad_checkpointing(True)
    with tr.reduce(m, "vision.block.*=tome(r=2)"), pytest.raises(tr.SiteError, match="gradient checkpointing is on"):
        m.encode_image(x)


@pytest.mark.parametrize("prefix", [dict(), dict(class_token=False, global_pool="avg"), dict(reg_tokens=2)],
                         ids=["cls", "no_prefix", "cls+2reg"])
def test_plans_that_skip_apply_plans_checks_and_sort_give_the_checked_result(monkeypatch, prefix):
    """built-in plans say they are valid (`checked`) and already in the stream's order
    (`ordered`) so that apply_plan launches no checking or sorting kernels; the result equals
    what the plain, checked and sorted path gives (ToMe with several protected tokens, CLS and
    registers, lists them first itself rather than leaving a sort to apply_plan)"""
    from dataclasses import replace
    from tokenreduce import hooks
    m = _tiny_timm(img_size=64, embed_dim=32, depth=3, num_heads=2, **prefix)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    middle = "random(keep=0.5)" if prefix.get("class_token") is False else "vtc_cls(keep=0.5)"  # no CLS row
    spec = f"vision.block.0=tome(r=3); vision.block.1={middle}; vision.block.2=random(keep=5)"
    seen = []
    with tr.reduce(m, spec), torch.no_grad():
        fast = m.forward_features(x)
        plain_apply = hooks.apply_plan

        def plain(stream, plan):
            seen.append((plan.checked, plan.ordered))
            return plain_apply(stream, replace(plan, checked=False, ordered=None))
        monkeypatch.setattr(hooks, "apply_plan", plain)
        slow = m.forward_features(x)
    assert fast.shape[1] == slow.shape[1] < 17 + m.num_prefix_tokens
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)
    assert [c for c, _ in seen] == [True] * 3
    assert [o for _, o in seen] == ["prefix"] * 3


@pytest.mark.parametrize("k", [0, 2, 5, 6, 9, -2])
def test_keep_top_visual_counted_on_the_host_keeps_exactly_k_even_for_minus_inf_scores(monkeypatch, k):
    """the host-counted path (a ViT's stream) keeps the protected tokens and the min(max(k, 0), visual)
    best visual ones in order, as the device-counted path does, also when visual tokens score -inf"""
    from tokenreduce.stream import TokenStream, apply_plan, keep_top_visual
    x = torch.randn(2, 7, 4, generator=torch.Generator().manual_seed(0))
    s = TokenStream.start(x, num_prefix=1)
    scores = torch.tensor([[0., 5, -float("inf"), 4, -float("inf"), 3, 2], [0., -float("inf"), 1, 2, 3, 4, 5]])
    host = keep_top_visual(s, scores, k)
    assert host.ordered == "prefix" and host.checked
    monkeypatch.setattr(TokenStream, "host_num_visual", lambda self: None)
    device = keep_top_visual(s, scores, torch.full((2,), max(k, 0)))
    assert torch.equal(host.keep, device.keep) and device.valid is None
    assert host.keep.shape[1] == 1 + min(max(k, 0), 6)
    out, _ = apply_plan(s, host)
    assert bool((out.pos[:, 0] == 0).all()) and bool((out.pos[:, 1:].diff(dim=1) > 0).all())


def test_host_budget_resolves_keep_as_budget_does():
    """the host-side count (no device read) equals budget()'s for counts, huge counts and fractions
    whose product is a .5 tie (both round half to even)"""
    from tokenreduce.stream import TokenStream
    for n in range(1, 30):
        for P in (0, 1, 4):
            s = TokenStream.start(torch.zeros(2, n + P, 3), num_prefix=P)
            for keep in (0, 1, 7, 10 ** 30, 0.5, 0.25, 0.125, 0.3, 0.7, 1.0, 1e-9):
                assert s.host_budget(keep) == int(s.budget(keep)[0]), (n, P, keep)
    with pytest.raises(ValueError, match="keep must be an int count or a float"):
        s.host_budget("half")
