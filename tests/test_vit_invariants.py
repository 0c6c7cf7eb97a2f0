"""DESIGN.md invariants 1, 2, 5, 6 for every ViT adapter (timm, open_clip, HF towers)."""
import torch

import tokenreduce as tr


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
