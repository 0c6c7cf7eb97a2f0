"""ToMe anchors (docs/ALGORITHMS.md §8.1, §8.2) and the pure matching function."""
import pytest
import torch

import tokenreduce as tr
from tokenreduce.ops import bipartite_soft_matching, parse_r
from tokenreduce.stream import Plan, TokenStream, apply_plan

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False).eval()


def _counts(model, r, batch=1):
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with tr.reduce(model, f"vision.block.*=tome(r={r!r})") as h, torch.no_grad():
        model(x)
        return h.stats["tokens"], h.trace


def test_vit_b16_r16_counts(vit_b16):
    tokens, trace = _counts(vit_b16, 16)
    assert tokens == [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]


def test_vit_b16_r13_ends_at_41_sizes_sum_cls_first(vit_b16):
    tokens, trace = _counts(vit_b16, 13, batch=2)
    assert tokens[-1] == 41
    last = trace["vision.block.11"]
    assert torch.equal(last["size"].sum(1), torch.full((2,), 197.0))
    assert torch.equal(last["pos"][:, 0], torch.zeros(2, dtype=torch.long))   # CLS stays at index 0
    assert float(last["size"][:, 0].max()) == 1.0                              # and is never merged


def test_decreasing_schedule(vit_b16):
    assert parse_r(12, (16, -1)) == parse_r(12, 16, -1.0)  # the reference's (r, inflection) tuple
    assert parse_r(12, (16, -1))[:2] == [32, 29]
    sched = parse_r(12, 8, -1.0)
    assert sched[0] == 16 and sched[-1] <= 1
    assert sched == sorted(sched, reverse=True)
    tokens, _ = _counts(vit_b16, (8, -1))
    assert tokens[1] == 197 - 16


def test_per_layer_list(vit_b16):
    tokens, _ = _counts(vit_b16, [10, 0, 5])
    assert tokens[:5] == [197, 187, 187, 182, 182]


def test_merge_with_unit_sizes_is_pair_average():
    """merge_wavg with all sizes 1 is a plain average of the merged tokens (§8.2)."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4)
    s = TokenStream.start(x, num_prefix=1)
    keep, assign, _, merged = bipartite_soft_matching(x, 3, s.protected)
    out, plan = apply_plan(s, Plan(keep=keep, assign=assign))
    for b in range(2):
        for slot in range(out.num_tokens):
            members = (plan.assign[b] == slot).nonzero().squeeze(1)
            assert torch.allclose(out.x[b, slot], x[b, members].mean(0), atol=1e-6)
            assert out.size[b, slot] == len(members)
    assert out.num_tokens == 9 - 3
    assert sorted(merged[0].tolist() + keep[0].tolist()) == list(range(9))  # the merged: all not kept


@pytest.mark.parametrize("weighted, normalize, dtype", [(False, True, torch.float32), (True, True, torch.float32),
                                                       (True, False, torch.float32), (False, True, torch.float16),
                                                       (False, True, torch.float64)])
def test_a_merge_over_the_listed_sources_equals_the_merge_over_all_tokens(weighted, normalize, dtype):
    """Plan.merged (ToMe's sources) lets apply_plan read the K kept and r merged tokens instead of
    summing all N into K slots in float32; features, sizes and sources come out the same (half
    precision: within its rounding), also when the stream's prefix order re-sorts the slots (two
    protected tokens)"""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 15, 8, generator=g).to(dtype)
    s = TokenStream.start(x, num_prefix=2, track_source=True)
    s.size = torch.randint(1, 4, (3, 15), generator=g).float()
    keep, assign, _, merged = bipartite_soft_matching(x.float(), 5, s.protected)
    w = torch.rand(3, 15, generator=g) + 0.1 if weighted else None
    dense, pd = apply_plan(s, Plan(keep=keep, assign=assign, weight=w, normalize=normalize))
    sparse, ps = apply_plan(s, Plan(keep=keep, assign=assign, weight=w, normalize=normalize, merged=merged))
    assert torch.equal(pd.keep, ps.keep) and torch.equal(dense.pos, sparse.pos)
    assert sparse.x.dtype == dense.x.dtype == dtype
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.float64: 1e-13}[dtype]
    torch.testing.assert_close(sparse.x, dense.x, rtol=tol, atol=tol)
    assert torch.equal(sparse.size, dense.size) and torch.equal(sparse.source, dense.source)
    assert float(sparse.size.sum()) == float(s.size.sum())


def test_r_is_clamped_and_protected_never_merged():
    x = torch.randn(1, 11, 8)
    prot = torch.zeros(1, 11, dtype=torch.bool)
    prot[:, :2] = True  # CLS + distillation token
    keep, assign, _, merged = bipartite_soft_matching(x, 100, prot)
    assert keep.shape[1] == 11 - (11 - 2) // 2
    assert assign[0, 0] != assign[0, 1]
    # nothing else folds into a protected token
    for p in (0, 1):
        assert int((assign[0] == assign[0, p]).sum()) == 1


def test_proportional_attention_changes_later_layers(vit_b16):
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with tr.reduce(vit_b16, "vision.block.*=tome(r=8)"):
            a = vit_b16(x)
        with tr.reduce(vit_b16, "vision.block.*=tome(r=8, prop_attn=False)"):
            b = vit_b16(x)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("P", [0, 1, 2, 3])
def test_matching_with_a_host_known_protected_count_equals_the_masked_matching(P):
    """num_protected (the first P tokens, known on the host) protects by slicing the score matrix;
    the result is the general path's, which reads the protected mask"""
    g = torch.Generator().manual_seed(P)
    metric = torch.randn(3, 14, 6, generator=g)
    prot = torch.zeros(3, 14, dtype=torch.bool)
    prot[:, :P] = True
    fast = bipartite_soft_matching(metric, 4, prot, num_protected=P)
    slow = bipartite_soft_matching(metric, 4, prot)
    for f, s in zip(fast, slow):
        assert torch.equal(f, s)
    assert not bool(torch.isin(fast[3], torch.arange(P)).any())  # a protected token is never merged away


@pytest.mark.parametrize("P", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("N", [14, 15])
def test_protected_first_matching_is_the_stream_order_without_a_resort(P, N):
    """protected_first lists the first P tokens in their own order, then the reference's
    [unmerged A, B]: exactly what applying the plain matching and re-sorting it into the ViT
    stream's prefix order gives (an argsort on the device per block), merges included."""
    g = torch.Generator().manual_seed(10 * P + N)
    x = torch.randn(3, N, 6, generator=g)
    s = TokenStream.start(x, num_prefix=P)
    plain = bipartite_soft_matching(x, 4, s.protected, num_protected=P)
    first = bipartite_soft_matching(x, 4, s.protected, num_protected=P, protected_first=True)
    assert torch.equal(first[3], plain[3]) and torch.equal(first[2], plain[2])  # same merges
    assert torch.equal(first[0][:, :P], torch.arange(P).expand(3, P))
    resorted, _ = apply_plan(s, Plan(keep=plain[0], assign=plain[1], checked=True))  # ordered=None: re-sorted
    direct, applied = apply_plan(s, Plan(keep=first[0], assign=first[1], checked=True, ordered="prefix"))
    assert torch.equal(applied.keep, first[0])  # taken as is
    for field in ("x", "pos", "size", "kind"):
        assert torch.equal(getattr(direct, field), getattr(resorted, field)), field
    # every token folds into the slot that holds its destination token
    assert torch.equal(first[0].gather(1, first[1]), plain[0].gather(1, plain[1]))


def test_protected_first_needs_the_host_count():
    x = torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match="num_protected"):
        bipartite_soft_matching(x, 2, torch.zeros(1, 8, dtype=torch.bool), protected_first=True)
