"""VTC-CLS: kept indices are sorted and equal the score computed from eager attention maps."""
import pytest
import torch

import tokenreduce as tr
from tokenreduce.errors import SiteError

from conftest import VIT_CASES

transformers = pytest.importorskip("transformers")


def _clip(layers=6):
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                        intermediate_size=128, image_size=48, patch_size=8)
    return transformers.CLIPVisionModel(cfg).eval()


def _eager_scores(model, x, layers):
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(pixel_values=x, output_attentions=True)
    model.set_attn_implementation("sdpa")
    # VTC-CLS reference: average heads, CLS row, drop the CLS column, sum over layers
    return sum(out.attentions[l].mean(1)[:, 0, 1:] for l in layers)


@pytest.mark.parametrize("keep", [5, 12, 0.5])
def test_vision_out_matches_eager_maps(keep):
    model = _clip()
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    start = 2
    with tr.reduce(model, f"vision.out=vtc_cls(keep={keep}, start={start})") as h, torch.no_grad():
        model(pixel_values=x)
        kept = h.trace["vision.out"]["pos"]
    layers = range(start, 6 - 1)            # start .. penultimate (the last layer excluded)
    scores = _eager_scores(model, x, layers)
    k = keep if isinstance(keep, int) else round(keep * 36)
    expected = scores.topk(k, dim=1).indices.sort(1).values + 1   # +1: CLS at position 0
    assert torch.equal(kept[:, 0], torch.zeros(2, dtype=torch.long))
    assert torch.equal(kept[:, 1:], expected)
    assert bool((kept[:, 1:].diff(dim=1) > 0).all())                # sorted ascending


def test_default_range_is_two_thirds_to_penultimate():
    site = tr.sites(_clip(layers=24))["vision.out"]
    assert tr.make_reducer("vtc_cls").score_layers(site) == tuple(range(16, 23))


def test_in_block_uses_own_layer_like_evit():
    model = _clip()
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with tr.reduce(model, "vision.block.2=vtc_cls(keep=10)") as h, torch.no_grad():
        model(pixel_values=x)
        kept = h.trace["vision.block.2"]["pos"]
    expected = _eager_scores(model, x, [2]).topk(10, dim=1).indices.sort(1).values + 1
    assert torch.equal(kept[:, 1:], expected)


def test_cls_signal_on_siglip_fails_at_reduce_time():
    torch.manual_seed(0)
    cfg = transformers.SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, image_size=32, patch_size=8)
    model = transformers.SiglipVisionModel(cfg).eval()
    with pytest.raises(SiteError, match=r"cls_attn.*SigLIP has no \[CLS\] token.*available here: keys, x"):
        tr.reduce(model, "vision.out=vtc_cls(keep=8)")
    assert "_tokenreduce_handle" not in model.__dict__


def test_future_layer_is_refused():
    with pytest.raises(SiteError, match="runs after this site"):
        tr.reduce(_clip(), "vision.block.1=vtc_cls(keep=8, layers=[3])")


@pytest.mark.parametrize("vit_case", [c for c in VIT_CASES if c.has_cls], ids=lambda c: c.name)
def test_layers_outside_the_model_are_refused_not_wrapped(vit_case):
    """layers=[depth + 6] used to wrap around to layer 6; negative indices count from the end"""
    model = vit_case.build()
    depth = tr.sites(model)["vision.out"].depth
    with pytest.raises(SiteError, match=rf"at layer {depth + 6}; valid layers: 0..{depth - 1}"):
        tr.reduce(model, f"vision.out=vtc_cls(keep=4, layers=[{depth + 6}])")
    with tr.reduce(model, "vision.out=vtc_cls(keep=4, layers=[-1])"):
        pass
    with pytest.raises(SiteError, match=rf"start={-depth - 1} is outside the model's layers; valid: {-depth}..{depth - 1}"):
        tr.reduce(model, f"vision.out=vtc_cls(keep=4, start={-depth - 1})")
