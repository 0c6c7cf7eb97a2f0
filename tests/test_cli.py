"""The `tokenreduce` command line."""
import json

from tokenreduce.eval.cli import main


def test_methods_lists_registry(capsys):
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name in ("tome", "vtc_cls", "random", "uniform"):
        assert name in rows and rows[name]["paper"]
    assert "arXiv:2210.09461" in rows["tome"]["paper"]


def test_sites(capsys):
    assert main(["sites", "timm:vit_tiny_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "vision.block.{0..11}" in out and "vision.out" in out and "timm_vit" in out
    assert main(["sites", "hf:tiny-siglip"]) == 0
    assert "SigLIP has no [CLS] token" in capsys.readouterr().out
    assert main(["sites", "hf:tiny-llava"]) == 0
    out = capsys.readouterr().out
    assert "llm.layer.{0..3}" in out and "projector.out" in out and "vision.out" in out
    assert main(["sites", "torchvision:swin3d_t"]) == 0
    assert "structured plans only" in capsys.readouterr().out


def test_sites_of_a_full_clip_or_siglip_config_file(tmp_path, capsys):
    """hf:DIR/config.json of a whole CLIP / SigLIP model (text + vision): its vision tower's sites"""
    import transformers as tf
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    for name, cfg in (("clip", tf.CLIPConfig(vision_config=dict(small, image_size=32, patch_size=8),
                                             text_config=small)),
                      ("siglip", tf.SiglipConfig(vision_config=dict(small, image_size=32, patch_size=8),
                                                 text_config=small))):
        cfg.save_pretrained(tmp_path / name)
        assert main(["sites", f"hf:{tmp_path / name / 'config.json'}"]) == 0
        assert "vision.block.{0..1}" in capsys.readouterr().out


def test_sites_bad_model_is_one_line_error(capsys):
    assert main(["sites", "hf:no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert "presets:" in err and "tiny-clip" in err and "Traceback" not in err


def test_bench_vit_writes_json(tmp_path, capsys):
    path = tmp_path / "b.json"
    assert main(["bench", "vit", "--model", "hf:tiny-clip", "--batch", "2", "--runs", "2",
                 "--warmup", "1", "--policy", "vision.block.*=tome(r=2)", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert res["tokens"] == [65, 63, 61, 59, 57]
    assert 0 < res["flops_fraction"] < 1 and res["baseline_ms"] > 0 and res["reduced_ms"] > 0
    assert len(res["machine_before"]["loadavg"]) == 3
    assert "speed-up" in capsys.readouterr().out


def test_bench_video_takes_frames_image_and_policy(capsys):
    """VideoMAE honours --frames / --image (4 frames of 64x64 -> 2 x 4 x 4 = 32 tokens); a
    --policy without --model is refused, since it names one model's sites"""
    import pytest
    assert main(["bench", "video", "--model", "videomae", "--frames", "4", "--image", "64", "--layers", "4",
                 "--runs", "1", "--warmup", "0", "--policy", "vision.layer.*=sta(r=4)"]) == 0
    assert "tokens [32, 24, 20, 16]" in capsys.readouterr().out
    assert main(["bench", "video", "--policy", "vision.layer.*=sta(r=4)"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenreduce: error: ") and "give --model videomae or --model swin" in err


def test_quality_takes_its_own_options(capsys):
    import pytest
    with pytest.raises(SystemExit) as e:
        main(["quality", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--policy SPEC" in out


def test_image_size_is_the_size_a_timm_model_was_built_for():
    import timm

    from tokenreduce.eval.models import image_size
    assert image_size(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=112)) == 112
    assert image_size(timm.create_model("vit_tiny_patch16_224", pretrained=False)) == 224
