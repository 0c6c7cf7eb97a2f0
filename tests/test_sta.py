"""STA (docs/ALGORITHMS.md section 4) on HF VideoMAE: token counts, time order, parity with a
reshape-based transcription of the reference, and the structured slice variant."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

pytest.importorskip("transformers")

import tokenreduce
from tokenreduce import PolicyError, SiteError
from tokenreduce.reducers.base import SiteInfo
from tokenreduce.reducers.sta import STA, paper_stage


def videomae(image=64, patch=16, frames=16, hidden=16, layers=6, seed=0):
    from transformers import VideoMAEConfig, VideoMAEModel
    torch.manual_seed(seed)
    cfg = VideoMAEConfig(image_size=image, patch_size=patch, num_frames=frames, tubelet_size=2, hidden_size=hidden,
                         num_hidden_layers=layers, num_attention_heads=2, intermediate_size=2 * hidden)
    return VideoMAEModel(cfg).eval()


def clip(b, frames, image, seed=1):
    return torch.randn(b, frames, 3, image, image, generator=torch.Generator().manual_seed(seed))


# -- the paper's stage placement -----------------------------------------------------------------------
def test_paper_stages_from_depth():
    def layers(depth):
        return [i for i in range(depth) if paper_stage(SiteInfo(f"vision.layer.{i}", "vision.layer", i, depth)) is not None]
    assert layers(24) == [1, 9, 17]   # ViT-L: after blocks 0, 8, 16
    assert layers(12) == [1, 5, 9]    # ViT-B: after blocks 0, 4, 8
    assert layers(6) == [1, 3, 5]


# -- token counts on the VideoMAE-L token layout (8 x 14 x 14 = 1568; small width) ----------------------
@pytest.fixture(scope="module")
def large_layout():
    return videomae(image=224, patch=16, frames=16, hidden=16, layers=6)


@pytest.mark.parametrize("r,expect", [(64, [1568, 1056, 800, 672]), (32, [1568, 1312, 1184, 1120])])
def test_token_counts_and_time_order(large_layout, r, expect):
    m = large_layout
    x = clip(1, 16, 224)
    with tokenreduce.reduce(m, f"vision.layer.*=sta(r={r})") as h, torch.no_grad():
        out = m(pixel_values=x).last_hidden_state
        toks = h.stats["tokens"]
        # distinct counts in order: start, after stage 0, after stage 1, after stage 2
        seen = [toks[0]] + [b for a, b in zip(toks, toks[1:]) if b != a]
        assert seen == expect
        assert out.shape[1] == expect[-1]
        acting = [k for k, v in h.stats["sites"].items() if v["tokens_out"] < v["tokens_in"]]
        assert acting == ["vision.layer.1", "vision.layer.3", "vision.layer.5"]
        for stage, site in enumerate(["vision.layer.1", "vision.layer.3", "vision.layer.5"]):
            frame = h.trace[site]["frame"]
            group = frame // 2 ** stage
            assert bool((group[:, 1:] >= group[:, :-1]).all())  # frames (groups) stay in time order
            counts = torch.bincount(frame[0], minlength=8)
            if stage == 0:
                assert counts.tolist() == [196 - r] * 8
        assert h.stats["flops_fraction"] < 1.0


# -- parity with a reshape-based transcription of the reference (model_vit.py `merge`) -----------------
def ref_merge(x, metric, index, depth, r):
    """The reference's merge step written independently from docs/ALGORITHMS.md section 4:
    reshape to (B, T, N, .) and walk the groups."""
    if index == 0:
        T, perm = 8, list(range(8))
    elif index == depth // 3:
        T, perm = 4, list(range(3, -1, -1))
    elif index == 2 * depth // 3:
        T, perm = 2, [0, 1]
    else:
        return x
    B, _, C = x.shape
    x = x.reshape(B, T, -1, C)
    metric = metric.reshape(B, T, x.shape[2], -1)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    N = x.shape[2]
    l1 = x.abs().sum(-1)
    sem = (l1 - l1.min(-1, keepdim=True).values) / (l1.max(-1, keepdim=True).values - l1.min(-1, keepdim=True).values)
    # first group: ToMe-style drop
    m = metric[:, perm[0]]
    node_max = (m[:, ::2] @ m[:, 1::2].transpose(-1, -2)).max(-1).values
    edge = node_max.argsort(-1)
    cat_x = torch.cat([x[:, perm[0], 1::2], x[:, perm[0], ::2].gather(1, edge[..., None].expand(-1, -1, C))], 1)
    cat_m = torch.cat([m[:, 1::2], m[:, ::2].gather(1, edge[..., None].expand(-1, -1, m.shape[-1]))], 1)
    pieces = [cat_x[:, :N - r]]
    for t in range(1, T):
        cur = metric[:, perm[t]]
        if t == 1:
            M = (cur @ cat_m.transpose(-1, -2)).softmax(dim=1)
            s_agg = M.sum(-1, keepdim=True)
        else:
            prev = metric[:, perm[t - 1]].gather(1, kept[..., None].expand(-1, -1, cur.shape[-1]))
            M = (cur @ prev.transpose(-1, -2)).softmax(dim=1)
            s_agg = M @ s_agg
        s = s_agg[..., 0] * (1 - sem[:, perm[t]])
        kept = s.topk(N - r, dim=1, largest=False).indices
        xt = x[:, perm[t]].gather(1, kept[..., None].expand(-1, -1, C))
        s_agg = s_agg.gather(1, kept[..., None])
        s_agg = s_agg / s_agg.sum(1, keepdim=True)
        pieces = [xt] + pieces if index == depth // 3 else pieces + [xt]
    return torch.cat(pieces, 1)


@torch.no_grad()
def reference_forward(m, pixels, r):
    """The VideoMAE forward with the reference's STA merge after blocks 0, depth/3, 2 depth/3."""
    x = m.embeddings(pixels, None)
    layers = m.encoder.layer
    for i, layer in enumerate(layers):
        a = layer.attention.attention
        k = a.key(layer.layernorm_before(x))
        k = k.reshape(*k.shape[:2], a.num_attention_heads, -1).mean(2)  # keys averaged over heads
        x = layer(x)
        x = ref_merge(x, k, i, len(layers), r)
    return x


@pytest.mark.parametrize("r", [3, 6])
def test_parity_with_reference_transcription(r):
    m = videomae(image=64, patch=16, frames=16, hidden=32, layers=6)  # 8 slots x 16 tokens
    x = clip(2, 16, 64)
    ref = reference_forward(m, x, r)
    with tokenreduce.reduce(m, f"vision.layer.*=sta(r={r})"), torch.no_grad():
        out = m(pixel_values=x).last_hidden_state
    assert out.shape == ref.shape == (2, 2 * (2 * (2 * (16 - r) - r) - r), 32)
    assert torch.allclose(out, ref, atol=1e-5)


def test_batch_is_per_sample():
    m = videomae(image=64, layers=4)
    x = clip(2, 16, 64)
    with tokenreduce.reduce(m, "vision.layer.*=sta(r=5)"), torch.no_grad():
        both = m(pixel_values=x).last_hidden_state
        single = torch.cat([m(pixel_values=x[i:i + 1]).last_hidden_state for i in range(2)])
    assert torch.allclose(both, single, atol=1e-5)


def test_keep_all_and_remove():
    m = videomae(image=64, layers=4)
    x = clip(1, 16, 64)
    with torch.no_grad():
        base = m(pixel_values=x).last_hidden_state
        with tokenreduce.reduce(m, "vision.layer.*=sta(r=0)"):
            assert torch.equal(m(pixel_values=x).last_hidden_state, base)
        with tokenreduce.reduce(m, "vision.layer.*=sta(r=[4, 0, 2])") as h:
            out = m(pixel_values=x).last_hidden_state
            assert out.shape[1] == 2 * (4 * 12 - 2)  # 8 x 12, then 4 x 24, then 2 x (48 - 2)
            assert h.stats["tokens"][-1] == out.shape[1]
        assert torch.equal(m(pixel_values=x).last_hidden_state, base)


def test_parameters_and_placement_errors():
    m = videomae(image=64, layers=3)
    with pytest.raises(PolicyError, match="r must be"):
        STA(r=-1)
    with pytest.raises(PolicyError, match="three ints"):
        STA(r=[1, 2])
    with pytest.raises(PolicyError, match="stage must be"):
        STA(stage=3)
    with pytest.raises(SiteError, match="vision.layer"):
        tokenreduce.reduce(m, "vision.block.1=sta(r=4)")
    with pytest.raises(SiteError, match="vision.layer.1 or later"):
        tokenreduce.reduce(m, "vision.layer.0=sta(r=4, stage=0)")
    with pytest.raises(SiteError, match=">= 4 blocks"):
        tokenreduce.reduce(m, "vision.layer.*=sta(r=4)")
    with tokenreduce.reduce(m, "vision.layer.1=sta(r=4, stage=0); vision.layer.2=sta(r=4, stage=1)") as h, torch.no_grad():
        assert m(pixel_values=clip(1, 16, 64)).last_hidden_state.shape[1] == 4 * (2 * 12 - 4)
    assert tokenreduce.parse_spec("vision.layer.*=sta(r=64)").to_spec() == "vision.layer.*=sta(r=64)"
    # STA needs equal groups: after an unstructured reducer it says so instead of mis-grouping
    with tokenreduce.reduce(m, "vision.block.0=tome(r=4); vision.layer.1=sta(r=4, stage=0)"), torch.no_grad():
        with pytest.raises(SiteError, match="same number of tokens"):
            m(pixel_values=clip(1, 16, 64))


def test_sta_slices_on_video_vit_drops_whole_slots():
    m = videomae(image=64, layers=3)
    x = clip(2, 16, 64)
    with tokenreduce.reduce(m, "vision.layer.1=sta_slices(r=3)") as h, torch.no_grad():
        out = m(pixel_values=x).last_hidden_state
        assert out.shape[1] == 5 * 16
        frame = h.trace["vision.layer.1"]["frame"]
        for row in frame:
            kept = row.unique()
            assert len(kept) == 5 and 0 in kept.tolist()  # the anchor slice stays
            assert torch.bincount(row, minlength=8)[kept].eq(16).all()  # whole slots
            assert bool((row[1:] >= row[:-1]).all())  # time order
