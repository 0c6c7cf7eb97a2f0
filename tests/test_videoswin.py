"""torchvision VideoSwin (swin3d_t) adapter: structured-only stage sites, invariants, frames site."""
import os
import threading

os.environ["HF_HUB_OFFLINE"] = "1"

from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("torchvision")

import tokenreduce
from concurrency import failures_in_threads
from tokenreduce import Plan, Policy, SiteError, Stage
from tokenreduce.eval.video import uniform_indices
from tokenreduce.reducers.base import Reducer


@pytest.fixture(scope="module")
def model():
    """torchvision's SwinTransformer3d with swin3d_t's layout (patch 2x4x4, window 8x7x7, four
    stages, PatchMerging between) at a small width, so the suite stays fast on 2 CPU cores."""
    from torchvision.models.video.swin_transformer import SwinTransformer3d
    torch.manual_seed(0)
    return SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
                             window_size=[8, 7, 7], stochastic_depth_prob=0.0, num_classes=400).eval()


def test_real_swin3d_t_noop_and_slice_drop():
    from torchvision.models.video import swin3d_t
    torch.manual_seed(0)
    m = swin3d_t(weights=None).eval()
    x = clip()
    base = run(m, x)
    with tokenreduce.reduce(m, "frames=frame_select(k=8); stage.*=sta_slices(r=0)"):
        assert torch.equal(run(m, x), base)
    with tokenreduce.reduce(m, "stage.1=sta_slices(r=2)") as h:
        out = run(m, x)
        assert out.shape == (1, 400) and not torch.allclose(out, base)
        assert h.stats["tokens"][2] == 2 * 4 * 4
    assert torch.equal(run(m, x), base)


@pytest.fixture(scope="module")
def base(model):
    return run(model, clip())


def clip(b=1, t=8, size=32, seed=1):
    return torch.randn(b, 3, t, size, size, generator=torch.Generator().manual_seed(seed))


def run(m, x):
    with torch.no_grad():
        return m(x)


# custom structured reducers (the adapter must check what they actually return)
@dataclass
class KeepSlices(Reducer):
    name = "keep_slices_test"
    site_families = ("stage",)
    structured = True
    slices: tuple = (0, 2)

    def plan(self, stream):
        T, H, W = stream.grid
        idx = torch.cat([torch.arange(t * H * W, (t + 1) * H * W) for t in self.slices])
        return Plan(keep=idx.expand(stream.batch, -1))


@dataclass
class CropBlock(Reducer):
    """Keeps a rectangular spatial block of every slice (window-aligned for the test's grid)."""
    name = "crop_block_test"
    site_families = ("stage",)
    structured = True

    def plan(self, stream):
        T, H, W = stream.grid
        t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H // 2), torch.arange(W // 2), indexing="ij")
        return Plan(keep=(t * H * W + h * W + w).reshape(1, -1).expand(stream.batch, -1))


@dataclass
class LiesAboutStructure(Reducer):
    """Claims to be structured but keeps an arbitrary token subset."""
    name = "liar_test"
    site_families = ("stage",)
    structured = True

    def plan(self, stream):
        g = torch.Generator().manual_seed(0)
        keep = torch.randperm(stream.num_tokens, generator=g)[: stream.num_tokens // 2].sort().values
        return Plan(keep=keep.expand(stream.batch, -1))


@dataclass
class MergeSlicePairs(Reducer):
    """Merges slice 2t+1 into slice 2t (a structured merging plan)."""
    name = "merge_pairs_test"
    site_families = ("stage",)
    structured = True

    def plan(self, stream):
        T, H, W = stream.grid
        n = H * W
        tok = torch.arange(T * n)
        slot_of_slice = torch.arange(T) // 2
        assign = slot_of_slice.repeat_interleave(n) * n + tok % n
        keep = torch.cat([torch.arange(t * n, (t + 1) * n) for t in range(0, T, 2)])
        B = stream.batch
        return Plan(keep=keep.expand(B, -1), assign=assign.expand(B, -1))


def test_sites_are_structured(model):
    s = tokenreduce.sites(model)
    assert set(s) == {"frames", "stage.0", "stage.1", "stage.2", "stage.3"}
    assert all(s[f"stage.{i}"].structured for i in range(4))
    assert tokenreduce.find_adapter(model).name == "videoswin"


@pytest.mark.parametrize("spec", ["stage.*=sta_slices(r=0)", "frames=frame_select(k=8)",
                                  "frames=frame_select(k=8); stage.1:=sta_slices(r=0)"])
def test_noop_equals_baseline(model, base, spec):
    x = clip()
    with tokenreduce.reduce(model, spec):
        assert torch.equal(run(model, x), base)


def test_temporal_slice_drop_runs_and_changes_logits(model, base):
    x = clip()
    with tokenreduce.reduce(model, "stage.1=sta_slices(r=1); stage.2=sta_slices(r=1)") as h:
        out = run(model, x)
        assert out.shape == (1, 400)
        assert not torch.allclose(out, base)
        assert h.stats["tokens"] == [4 * 8 * 8, 4 * 8 * 8, 3 * 4 * 4, 2 * 2 * 2, 2 * 1 * 1]
        assert 0.0 < h.stats["flops_fraction"] < 1.0
        frame = h.trace["stage.2"]["frame"][0]
        kept = frame.unique()
        assert len(kept) == 2 and 0 in kept.tolist()
    assert torch.equal(run(model, x), base)  # invariant 2


def test_dropping_slices_equals_a_model_that_never_saw_them(model):
    """Slices dropped at stage.0 are gone for good: same as feeding only their frames (tubelet 2)."""
    x = clip(t=8)
    pol = Policy([Stage("stage.0", KeepSlices(slices=(0, 2)))])
    with tokenreduce.reduce(model, pol):
        out = run(model, x)
    ref = run(model, x[:, :, [0, 1, 4, 5]])
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("spec", ["stage.1=random(keep=0.5)", "stage.2=tome(r=4)", "stage.0=uniform(keep=0.5)"])
def test_unstructured_reducer_refused_at_reduce(model, spec):
    with pytest.raises(SiteError, match="accepts only structured reducers") as e:
        tokenreduce.reduce(model, spec)
    assert "dense (T, H, W) token grid" in str(e.value) and "sta_slices" in str(e.value)


def test_structured_reducer_with_unstructured_plan_fails_clearly(model):
    with tokenreduce.reduce(model, Policy([Stage("stage.1", LiesAboutStructure())])):
        with pytest.raises(SiteError, match="do not form whole temporal slices"):
            run(model, clip())


def test_rectangular_block_is_accepted(model):
    with tokenreduce.reduce(model, Policy([Stage("stage.1", CropBlock())])) as h:
        out = run(model, clip())
        assert out.shape == (1, 400) and torch.isfinite(out).all()
        assert h.stats["tokens"][2] == 4 * 2 * 2


def test_merged_slices_conserve_size_and_pool_by_size(model):
    x = clip()
    with tokenreduce.reduce(model, Policy([Stage("stage.1", MergeSlicePairs())])) as h:
        out = run(model, x)
        tr = h.trace["stage.1"]
        assert torch.allclose(tr["size"].sum(1), torch.tensor([4.0 * 4 * 4]))  # invariant 5
        assert h.adapter._pass.slice_size.tolist() == [[2.0, 2.0]]
        assert torch.isfinite(out).all()


def test_same_input_same_output(model):
    x = clip()
    with tokenreduce.reduce(model, "stage.1=sta_slices(r=2)"):
        a = run(model, x)
    with tokenreduce.reduce(model, "stage.1=sta_slices(r=2)"):
        b = run(model, x)
    assert torch.equal(a, b)


def test_frames_site_selects_frames(model):
    x = clip(t=16)
    idx = torch.as_tensor(uniform_indices(16, 8))
    ref = run(model, x[:, :, idx])
    with tokenreduce.reduce(model, "frames=frame_select(k=8)") as h:
        assert torch.equal(run(model, x), ref)
        assert h.stats["kept_frames"].tolist() == [idx.tolist()]


def test_sta_slices_pooled_scoring(model):
    """Scores on pooled slices (pool=4 on a 16x16 stage-0 grid) still drop whole slices; without
    pooling (pool=0) the same reducer scores every token."""
    x = clip(size=64)
    for pool in (4, 0):
        with tokenreduce.reduce(model, f"stage.0=sta_slices(r=1, pool={pool})") as h:
            out = run(model, x)
            assert out.shape == (1, 400)
            assert h.stats["tokens"][1] == 3 * 16 * 16
            frame = h.trace["stage.0"]["frame"][0]
            assert torch.bincount(frame).tolist().count(256) == 3


def test_sta_slices_parameters():
    from tokenreduce import PolicyError
    from tokenreduce.reducers.sta_slices import STASlices
    with pytest.raises(PolicyError, match="sta_slices: r must be"):
        STASlices(r=1.5)
    with pytest.raises(PolicyError, match="sta_slices: r must be"):
        STASlices(r=-1)
    with pytest.raises(PolicyError, match="pool must be"):
        STASlices(pool=-2)
    assert STASlices(r=0.5).r == 0.5


def test_two_threads_can_run_one_reduced_videoswin(model):
    """a forward's slice bookkeeping is per thread: clips of different lengths from two threads
    at once give what each gives alone (merged slices weight the pooling)"""
    inputs = [clip(b=2, t=8, seed=3), clip(b=1, t=16, seed=4)]
    policy = Policy([Stage("stage.0", MergeSlicePairs()), Stage("stage.1", tokenreduce.make_reducer("sta_slices", {"r": 1}))])
    with torch.no_grad(), tokenreduce.reduce(model, policy) as h:
        want = [model(x) for x in inputs]
        alone = h.stats["flops_fraction"]
        assert alone < 1 and failures_in_threads(model, inputs, want, torch.equal, reps=6) == []
        # stats read from a thread that ran no forward: the latest pass of any, FLOPs included
        seen = {}
        for work in (lambda: model(inputs[1]), lambda: seen.update(h.stats)):
            t = threading.Thread(target=work)
            t.start()
            t.join()
        assert seen.get("flops_fraction") == alone
