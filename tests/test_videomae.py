"""HF VideoMAE adapter: sites, invariants 1/2/5/6, ToMe on a video ViT, frames site."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tokenreduce
from tokenreduce import SiteError
from tokenreduce.eval.video import uniform_indices


def tiny(classifier=True, frames=8, layers=4, seed=0, **kw):
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification, VideoMAEModel
    torch.manual_seed(seed)
    cfg = VideoMAEConfig(image_size=32, patch_size=8, num_frames=frames, tubelet_size=2, hidden_size=32,
                         num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64, num_labels=5, **kw)
    return (VideoMAEForVideoClassification if classifier else VideoMAEModel)(cfg).eval()


def video(b=2, t=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 3, 32, 32, generator=g)


def run(m, x):
    with torch.no_grad():
        out = m(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def model():
    return tiny()


def test_adapter_found_and_sites(model):
    s = tokenreduce.sites(model)
    assert tokenreduce.find_adapter(model).name == "videomae"
    assert {"frames", "vision.layer.0", "vision.block.2", "vision.out"} <= set(s)
    assert "cls_attn" not in s["vision.block.1"].signals and "keys" in s["vision.block.1"].signals
    assert tokenreduce.find_adapter(tiny(classifier=False)).name == "videomae"


@pytest.mark.parametrize("spec", [
    "vision.block.*=tome(r=0)",
    "vision.layer.*=sta(r=0)",
    "vision.layer.*=sta_slices(r=0)",
    "frames=frame_select(k=8)",
    "vision.out=random(keep=1.0)",
    "vision.block.1=uniform(keep=1.0); vision.layer.3=random(keep=1.0)",
])
def test_keep_all_is_bit_exact(model, spec):
    x = video()
    base = run(model, x)
    with tokenreduce.reduce(model, spec):
        assert torch.equal(run(model, x), base)


def test_remove_restores_bit_identical(model):
    x = video()
    base = run(model, x)
    attn = model.videomae.encoder.layer[0].attention.attention
    cfg = attn.config
    h = tokenreduce.reduce(model, "vision.layer.1=sta(r=4, stage=0); vision.block.1:=tome(r=6)")
    assert attn.config is not cfg  # prop_attn routes this instance through the bias function
    reduced = run(model, x)
    assert not torch.equal(reduced, base)
    h.remove()
    assert attn.config is cfg and "_tokenreduce_attn" not in vars(attn)
    assert torch.equal(run(model, x), base)


def test_tome_on_video_vit_counts_and_sizes(model):
    x = video()
    with tokenreduce.reduce(model, "vision.block.*=tome(r=8, trace_source=True); vision.out=random(keep=1.0)") as h:
        run(model, x)
        assert h.stats["tokens"] == [64, 56, 48, 40, 32]
        tr = h.trace["vision.out"]
        assert torch.allclose(tr["size"].sum(1), torch.full((2,), 64.0))  # merging conserves size
        pos = tr["pos"]
        assert all(len(set(p.tolist())) == p.numel() for p in pos)  # survivors keep original positions
        assert int(pos.max()) < 64
        assert torch.allclose(tr["source"].sum(-1), tr["size"])  # each token's source rows sum to its size
        assert h.stats["flops_fraction"] < 1.0


def test_prop_attn_changes_attention_through_interface(model):
    x = video()
    with tokenreduce.reduce(model, "vision.block.*=tome(r=8)"):
        a = run(model, x)
    with tokenreduce.reduce(model, "vision.block.*=tome(r=8, prop_attn=False)"):
        b = run(model, x)
    assert not torch.allclose(a, b)


def test_size_weighted_mean_pool(model):
    x = video()
    captured = {}
    def grab(module, args, output):
        captured["x"] = output.last_hidden_state

    hk = model.videomae.register_forward_hook(grab)
    try:
        with tokenreduce.reduce(model, "vision.block.*=tome(r=8)") as h:
            logits = run(model, x)
            size = h.adapter._pass.final.size
    finally:
        hk.remove()
    tokens = captured["x"]
    w = size[..., None]
    pooled = (tokens * w).sum(1) / w.sum(1)
    with torch.no_grad():
        expect = model.classifier(model.fc_norm(pooled))
        plain = model.classifier(model.fc_norm(tokens.mean(1)))
    assert torch.allclose(logits, expect, atol=1e-6)
    assert not torch.allclose(logits, plain, atol=1e-6)


def test_same_seed_same_output(model):
    x = video()
    outs = []
    for _ in range(2):
        with tokenreduce.reduce(model, "vision.layer.1=random(keep=0.5, seed=3); vision.block.2=tome(r=4)"):
            outs.append(run(model, x))
    assert torch.equal(outs[0], outs[1])
    with tokenreduce.reduce(model, "vision.layer.1=random(keep=0.5, seed=4); vision.block.2=tome(r=4)"):
        assert not torch.equal(run(model, x), outs[0])


def test_batch_equals_single_samples(model):
    x = video(b=2)
    with tokenreduce.reduce(model, "vision.layer.1=sta(r=4, stage=0); vision.block.1:=tome(r=6)"):
        both = run(model, x)
        single = torch.cat([run(model, x[i:i + 1]) for i in range(2)])
    assert torch.allclose(both, single, atol=1e-5)


def test_frames_site_selects_pixels(model):
    x = video(t=16)
    idx = torch.as_tensor(uniform_indices(16, 8))
    ref = run(model, x[:, idx])
    with tokenreduce.reduce(model, "frames=frame_select(k=8)") as h:
        out = run(model, x)
        assert torch.equal(out, ref)
        assert h.stats["sites"]["frames"]["tokens_out"] == 8
        assert h.stats["kept_frames"].tolist() == [idx.tolist()] * 2
        assert h.trace["frames"]["pos"].tolist() == [idx.tolist()] * 2


def test_frames_site_must_fit_num_frames(model):
    with tokenreduce.reduce(model, "frames=frame_select(k=4)"):
        with pytest.raises(SiteError, match="num_frames=8"):
            run(model, video(t=16))


def test_frames_and_tokens_together(model):
    x = video(t=16)
    with tokenreduce.reduce(model, "frames=frame_select(k=8); vision.layer.1:=sta(r=4, stage=0)") as h:
        out = run(model, x)
        assert out.shape == (2, 5)
        assert set(h.stats["sites"]) == {"frames", "vision.layer.1", "vision.layer.2", "vision.layer.3"}


def test_unknown_site_names_choices(model):
    with pytest.raises(SiteError, match="vision.block"):
        tokenreduce.reduce(model, "stage.1=sta_slices(r=1)")


def test_inputs_and_models_the_token_sites_cannot_serve_are_refused():
    # a classifier without mean pooling reads its first token: token sites would move it
    cls_token = tiny(use_mean_pooling=False)
    with pytest.raises(SiteError, match=r"use_mean_pooling=False.*only the frames site"):
        tokenreduce.reduce(cls_token, "vision.layer.1=uniform(keep=0.5)")
    with tokenreduce.reduce(cls_token, "frames=frame_select(k=8)"):
        run(cls_token, video(t=16))
    # MAE masks: the visible tokens are not the grid the reducers are told about
    m = tiny(classifier=False)
    masked = torch.zeros(2, 64, dtype=torch.bool)
    masked[:, ::2] = True
    with tokenreduce.reduce(m, "vision.layer.1=uniform(keep=0.5)"), torch.no_grad():
        with pytest.raises(SiteError, match="bool_masked_pos"):
            m(video(), bool_masked_pos=masked)
    # too few frames for the model, with nothing left to select
    with tokenreduce.reduce(tiny(), "frames=frame_select(k=8)") as h, torch.no_grad():
        with pytest.raises(SiteError, match="the clip has 6 frames .* config.num_frames=8; give at least 8"):
            h.model(video(t=6))


def test_a_module_inside_or_around_a_reduced_one_is_refused():
    clf = tiny()
    with tokenreduce.reduce(clf, "vision.layer.2=uniform(keep=0.5)"):
        with pytest.raises(SiteError, match="VideoMAEForVideoClassification around this VideoMAEModel is already reduced"):
            tokenreduce.reduce(clf.videomae, "vision.layer.1=uniform(keep=0.5)")
    with tokenreduce.reduce(clf.videomae, "vision.layer.1=uniform(keep=0.5)"):
        with pytest.raises(SiteError, match="VideoMAEModel inside this VideoMAEForVideoClassification"):
            tokenreduce.reduce(clf, "vision.layer.2=uniform(keep=0.5)")
    with tokenreduce.reduce(clf.videomae, "vision.layer.1=uniform(keep=0.5)"):  # removed: free again
        run(clf, video())


def test_sta_names_the_slot_count_it_needs():
    """6 frames are 3 tubelets: stage 1 pairs slots, so the message asks for slots, not frames"""
    m = tiny(frames=6)
    with tokenreduce.reduce(m, "vision.layer.*=sta(r=2)"):
        with pytest.raises(SiteError, match=r"groups 2 temporal slots .* the video has 3; .* multiple of 2 x the "
                                            r"tubelet size"):
            run(m, video(t=6))
