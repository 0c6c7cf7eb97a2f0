"""Bad command-line input gets a one-line error that names the valid choices (eval/cli.py and the
benchmarks, sweeps and model specs behind it); nothing the user gave is silently replaced."""
import json

import pytest
import torch

from tokenreduce.eval import cli
from tokenreduce.eval.cli import main


def _usage_error(capsys, argv) -> str:
    """argparse refuses argv: exit status 2, the message on stderr"""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def _error(capsys, argv) -> str:
    """main returns 2 with one 'tokenreduce: error:' line and no traceback"""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenreduce: error: ") and "Traceback" not in err
    return err


# -- 1: thread counts ---------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["bench", "vit", "--threads", "-2"],
                                  ["eval", "sweep", "--data", "x.jsonl", "--out", "o", "--threads", "-1"],
                                  ["eval", "videoqa", "--data", "x.jsonl", "--out", "o", "--threads", "-1"],
                                  ["eval", "report", "--threads", "-1"],
                                  ["quality", "--threads", "-1"]])
def test_negative_threads_are_refused_before_anything_runs(capsys, argv):
    err = _usage_error(capsys, argv)
    assert "--threads" in err and ">= 0" in err and "torch's default" in err


def test_quality_takes_threads_0_as_torchs_default(capsys, tmp_path):
    from tokenreduce.eval import quality
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="threads must be an int >= 0"):
        quality.run(["vision.block.*=tome(r=1)"], threads=-1)
    with pytest.raises(SystemExit):
        quality.main(["--out", str(tmp_path / "q"), "--threads", "-1"])
    assert "must be >= 0 (0 = torch's default)" in capsys.readouterr().err
    assert torch.get_num_threads() == before and not (tmp_path / "q").exists()


# -- 2 / 3: devices and sizes --------------------------------------------------------------------
def test_bench_device_forms(capsys):
    err = _error(capsys, ["bench", "vit", "--device", "gpu"])
    assert "unknown --device 'gpu'" in err and "cpu, cuda, cuda:N" in err
    if not torch.cuda.is_available():
        err = _error(capsys, ["bench", "vlm", "--device", "cuda:0"])
        assert "CUDA is not available" in err and "--device cpu" in err


@pytest.mark.parametrize("argv, flag, low", [
    (["bench", "vit", "--batch", "-1"], "--batch", 1),
    (["bench", "vit", "--batch", "0"], "--batch", 1),
    (["bench", "vit", "--image", "0"], "--image", 1),
    (["bench", "vit", "--warmup", "-1"], "--warmup", 0),
    (["bench", "vit", "--runs", "0"], "--runs", 1),
    (["bench", "vlm", "--frames", "-1"], "--frames", 1),
    (["bench", "vlm", "--frames", "0"], "--frames", 1),
    (["bench", "vlm", "--layers", "0"], "--layers", 1),
    (["bench", "vlm", "--vision-layers", "0"], "--vision-layers", 1),
    (["bench", "vlm", "--decode-tokens", "0"], "--decode-tokens", 1),
    (["bench", "video", "--frames", "0"], "--frames", 1)])
def test_bench_sizes_out_of_range_are_refused_not_defaulted(capsys, argv, flag, low):
    err = _usage_error(capsys, argv)
    assert f"argument {flag}: must be >= {low}" in err


def test_bench_functions_check_their_counts_too():
    from tokenreduce.eval.bench import bench_vit
    from tokenreduce.eval.bench_vlm import bench_vlm
    with pytest.raises(ValueError, match="--decode-tokens must be a whole number >= 1, got 0"):
        bench_vlm(frames=1, vision_layers=1, llm_layers=1, decode_tokens=0)
    with pytest.raises(ValueError, match="--frames must be a whole number >= 1, got 0"):
        bench_vlm(frames=0)
    with pytest.raises(ValueError, match="--batch must be a whole number >= 1, got 0"):
        bench_vit("hf:tiny-clip", batch=0)


def test_bench_vit_image_must_fit_the_patches(capsys):
    err = _error(capsys, ["bench", "vit", "--model", "hf:tiny-clip", "--image", "17"])
    assert "--image 17" in err and "multiple of 8" in err and "16 or 24" in err
    # a size the model was not built for (HF CLIP does not interpolate): refused in one line
    err = _error(capsys, ["bench", "vit", "--model", "hf:tiny-clip", "--image", "32", "--runs", "1"])
    assert "--image 32" in err and "built for 64x64" in err


def test_bench_vit_takes_a_models_own_size_even_off_the_patch_grid():
    """timm's SigLIP-384 towers (patch 14) are built at 384, which timm floors to 27 x 27 patches:
    the default size is the model's, so it is not checked against the patch"""
    import timm

    from tokenreduce.eval.bench import bench_vit
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=40, patch_size=14, depth=1)
    res = bench_vit(model, "vision.block.*=tome(r=1)", batch=1, runs=1, warmup=0)
    assert res["tokens"][0] == 2 * 2 + 1


def test_bench_vit_image_rebuilds_a_timm_model_for_that_size(tmp_path):
    path = tmp_path / "b.json"
    assert main(["bench", "vit", "--model", "timm:vit_tiny_patch16_224", "--image", "32", "--batch", "1",
                 "--runs", "1", "--warmup", "0", "--policy", "vision.block.*=tome(r=1)", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert res["image"] == 32 and res["tokens"][0] == 5  # 2 x 2 patches + [CLS]


def test_bench_vit_refuses_flags_of_other_benchmarks(capsys):
    err = _error(capsys, ["bench", "vit", "--frames", "4", "--layers", "3"])
    assert "bench vit: --frames, --layers cannot apply" in err and "--frames is for bench vlm / video" in err
    assert "it takes --model" in err
    err = _error(capsys, ["bench", "vit", "--decode-tokens", "4"])
    assert "--decode-tokens" in err and "bench vlm" in err
    err = _error(capsys, ["bench", "video", "--vision-layers", "2"])
    assert "bench video: --vision-layers cannot apply" in err
    err = _error(capsys, ["bench", "vlm", "--cuda-graph"])
    assert "bench vlm: --cuda-graph cannot apply" in err and "--cuda-graph is for bench vit" in err


def test_bench_compares_the_first_tensor_of_any_model_output():
    """--cuda-graph checks the replayed output against the eager one: a timm tensor, an open_clip
    tuple or a transformers ModelOutput (hf: models) all reduce to their first tensor"""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from tokenreduce.eval.bench import first_tensor
    t = torch.arange(6.).reshape(2, 3)
    assert first_tensor(t) is t and first_tensor((t, t + 1)) is t
    assert first_tensor(BaseModelOutputWithPooling(last_hidden_state=t, pooler_output=t[:, 0])) is t


def test_bench_vit_cuda_graph_needs_a_cuda_device(capsys):
    err = _error(capsys, ["bench", "vit", "--model", "hf:tiny-clip", "--cuda-graph", "--runs", "1"])
    assert "--cuda-graph needs a CUDA device (--device cuda), got --device cpu" in err


def test_bench_vit_graph_report_claims_no_reducer_time():
    """A CUDA-graph replay runs no Python: its report says the reducers take no host time rather
    than passing off the first eager forward's set-up (80 ms on an H100) as their cost."""
    from tokenreduce.eval.bench import format_vit
    res = {"model": "m", "batch": 1, "image": 224, "device": "cuda", "dtype": "float16", "cuda_graph": True,
           "graph_vs_eager_max_abs": 0.0, "policy": "p", "baseline_ms": 2.0, "reduced_ms": 1.0, "speedup": 2.0,
           "flops_fraction": 0.5, "flops_bound_speedup": 2.0, "speedup_vs_flops_bound": 1.0, "tokens": [197],
           "reducer_ms": None, "machine_before": {"loadavg": [0]}, "machine_after": {"loadavg": [0]}}
    assert "time in reducers: none in a replay" in format_vit(res)
    assert "time in reducers 1.50 ms/forward" in format_vit(dict(res, cuda_graph=False, reducer_ms=1.5))


def test_bench_video_sizes_that_videomae_cannot_take(capsys):
    err = _error(capsys, ["bench", "video", "--model", "videomae", "--frames", "3", "--runs", "1"])
    assert "--frames 3" in err and "multiple of 2" in err
    err = _error(capsys, ["bench", "video", "--model", "videomae", "--image", "40", "--runs", "1"])
    assert "--image 40" in err and "multiple of 16" in err


# -- 4 / 5: bench vlm policies -------------------------------------------------------------------
@pytest.fixture
def tiny_onevision(monkeypatch):
    """bench vlm's model at a few million parameters (the 384-px video input stays)"""
    import transformers as tf

    from tokenreduce.eval import bench_vlm

    def config(frames=8, vision_layers=27, llm_layers=24):
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                                       num_attention_heads=2, image_size=384, patch_size=14)
        text = tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=llm_layers,
                              num_attention_heads=2, num_key_value_heads=1, vocab_size=151936,
                              max_position_embeddings=32768, tie_word_embeddings=True)
        return tf.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=151646,
                                       video_token_index=151647, vision_feature_select_strategy="full",
                                       vision_feature_layer=-1)
    monkeypatch.setattr(bench_vlm, "onevision_config", config)


SMALL_VLM = ["bench", "vlm", "--frames", "1", "--layers", "3", "--vision-layers", "1", "--runs", "1",
             "--warmup", "0", "--decode-tokens", "1"]


def test_bench_vlm_policy_the_user_gave_must_run(capsys, tiny_onevision):
    err = _error(capsys, SMALL_VLM + ["--policy", "llm.layer.5=fastv(ratio=0.5)"])
    assert "llm.layer.5" in err and "0..2" in err
    assert "skipping" not in capsys.readouterr().out
    err = _error(capsys, SMALL_VLM + ["--policies", '{"ok": "llm.layer.1=fastv(ratio=0.5)", '
                                                    '"typo": "llm.layer.1=fastvv(ratio=0.5)"}'])
    assert "'typo'" in err and "unknown method 'fastvv'" in err and "fastv" in err


def test_bench_vlm_skips_a_default_policy_that_cannot_take_the_input(capsys, tiny_onevision):
    """--frames 1: dycoke_ttm (it prunes frames) fails when the model runs; a default policy is
    skipped with its reason and the others are measured (a --policy the user gave still fails:
    test_cli_inputs.py::test_bench_vlm_policy_the_user_gave_must_run)"""
    from tokenreduce.eval.cli import main
    assert main(SMALL_VLM) == 0
    out = capsys.readouterr().out
    assert "skipping dycoke_ttm: " in out and "single frame" in out
    assert "| baseline |" in out and "| random |" in out and "| dycoke_ttm |" not in out


def test_bench_vlm_a_user_policy_that_fails_on_the_input_still_fails(capsys, tiny_onevision):
    from tokenreduce.eval.cli import main
    assert main(SMALL_VLM + ["--policy", "projector.out=dycoke_ttm(ratio=0.7)"]) == 2
    captured = capsys.readouterr()
    assert "policy 'policy'" in captured.err and "single frame" in captured.err
    assert "skipping" not in captured.out


def test_bench_vlm_pins_the_attention_kernel(capsys, tiny_onevision, monkeypatch):
    """--sdpa math: every SDPA call of the timed forwards runs the math kernel (a CUDA-only
    kernel on a CPU is refused naming the valid ones)"""
    import torch.nn.functional as F

    from tokenreduce.eval.cli import main
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*a, **k):
        seen.append(torch._C._get_math_sdp_enabled() and not torch._C._get_flash_sdp_enabled())
        return real(*a, **k)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    assert main(SMALL_VLM + ["--policy", "projector.out=random(keep=0.5)", "--sdpa", "math"]) == 0
    out = capsys.readouterr().out
    assert "sdpa math" in out and "| policy |" in out
    assert seen and all(seen)
    err = _error(capsys, SMALL_VLM + ["--sdpa", "cudnn"])
    assert "--sdpa 'cudnn' is not available on cpu; valid: auto, flash, math" in err
    err = _error(capsys, ["bench", "vit", "--sdpa", "math"])
    assert "--sdpa is for bench vlm" in err


def test_bench_vlm_policies_json_errors_name_the_flag(capsys):
    err = _error(capsys, ["bench", "vlm", "--policies", "{bad"])
    assert "--policies must be a JSON object {name: spec}" in err
    err = _error(capsys, ["bench", "vlm", "--policies", '["x"]'])
    assert "--policies must be a JSON object {name: spec}, got a JSON list" in err
    err = _error(capsys, ["bench", "vlm", "--policies", '{"a": 1}'])
    assert "spec strings" in err and "'a'" in err


def test_bench_vlm_runs_the_given_policies_against_the_baseline(tmp_path, capsys, tiny_onevision):
    """no "baseline" in --policies: it is measured anyway, and --policy adds to --policies"""
    path = tmp_path / "vlm.json"
    assert main(SMALL_VLM + ["--policies", '{"fast": "llm.layer.1=fastv(ratio=0.5)"}',
                             "--policy", "projector.out=random(keep=0.5)", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert list(res["results"]) == ["baseline", "fast", "policy"]
    assert res["policies"]["policy"].startswith("projector.out=random")
    assert res["results"]["policy"]["kv_bytes"] < res["results"]["baseline"]["kv_bytes"]
    assert res["results"]["policy"]["llm_input_tokens"] < res["results"]["fast"]["llm_input_tokens"]


def test_bench_vlm_reports_the_spread_of_the_per_round_speed_ups(tmp_path, capsys, tiny_onevision):
    """each round runs every method once, so a round's ratio compares like with like; the
    table gives the median and the range of those ratios, the JSON the range"""
    path = tmp_path / "vlm.json"
    argv = [a if a != "1" or i != SMALL_VLM.index("--runs") + 1 else "3" for i, a in enumerate(SMALL_VLM)]
    assert main(argv + ["--policy", "projector.out=random(keep=0.5)", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    res = json.loads(path.read_text())
    assert res["runs"] == 3
    for key in ("prefill", "ttft", "decode"):
        lo, hi = res["results"]["policy"][f"{key}_speedup_range"]
        assert lo <= hi and lo > 0
        assert res["results"]["baseline"][f"{key}_speedup_range"] == [1.0, 1.0]
    lo, hi = res["results"]["policy"]["prefill_speedup_range"]
    assert f"({lo:.2f}-{hi:.2f})" in out and "lowest and highest" in out


# -- 6 / 7: sweeps -------------------------------------------------------------------------------
def test_sweep_checks_every_policy_before_running(tmp_path, capsys):
    from tokenreduce.eval.sweep import plan_runs
    with pytest.raises(ValueError, match=r"run 'bad': policy 'llm.layer.2=fastvv\(ratio=0.5\)': unknown method "
                                         r"'fastvv'; valid methods: .*fastv"):
        plan_runs(["fastv"], [0.5], 8, {"bad": "llm.layer.2=fastvv(ratio=0.5)"})
    assert plan_runs([], [], 8, {"x": "none"})[1] == ("x", "x", None, "")
    out = tmp_path / "sweep"
    err = _error(capsys, ["eval", "sweep", "--data", str(tmp_path / "set.jsonl"), "--out", str(out),
                          "--policies", '{"bad": "llm.layer.2=fastvv(ratio=0.5)"}'])
    assert "run 'bad'" in err and "fastvv" in err
    assert not out.exists()  # not even the baseline ran
    err = _error(capsys, ["eval", "sweep", "--data", "x.jsonl", "--out", str(out), "--policies", "nofile.json"])
    assert "--policies nofile.json: no such file" in err
    err = _error(capsys, ["eval", "sweep", "--data", "x.jsonl", "--out", str(out), "--policies", "conf/p.yaml"])
    assert "no such file" in err


def _row(label, method, budget, tokens):
    return {"label": label, "method": method, "budget": budget, "policy": "", "n": 4, "errors": 0,
            "acc_loglik": 0.5, "acc_generated": 0.25, "visual_tokens_llm_input": tokens,
            "visual_tokens_final": tokens, "flops_fraction": 1.0, "prefill_ms": 1.0, "ttft_ms": 2.0,
            "decode_ms_per_token": 0.5, "loadavg": [0, 0, 0]}


def test_sweep_outputs_keep_the_runs_of_earlier_sweeps(tmp_path, capsys):
    from tokenreduce.eval.sweep import write_outputs
    out = tmp_path / "sweep"
    for d in ("baseline", "fastv_b0.5", "random_b0.5", "mine"):
        (out / d).mkdir(parents=True)
    write_outputs([_row("baseline", "baseline", None, 33), _row("fastv_b0.5", "fastv", 0.5, 17)], out)
    # a finished run that no sweep.json lists (an interrupted sweep): read from its summary.json
    summary = {"n": 4, "errors": 0, "loglik": 0.75, "generated": 0.5, "visual_tokens": {"llm_input": 9, "final": 9},
               "flops_fraction": 0.4, "prefill_ms": 1.0, "ttft_ms": 2.0, "decode_ms_per_token": 0.5,
               "loadavg_end": [0, 0, 0]}
    (out / "mine" / "summary.json").write_text(json.dumps(summary))
    (out / "mine" / "run.json").write_text(json.dumps({"config": {"policy": "projector.out=uniform(keep=0.25)"}}))
    # the second sweep: a new method, and the baseline again (its new row replaces the old one)
    rows = write_outputs([_row("baseline", "baseline", None, 32), _row("random_b0.5", "random", 0.5, 16)], out)
    saved = json.loads((out / "sweep.json").read_text())
    assert saved == rows
    assert [r["label"] for r in saved] == ["baseline", "fastv_b0.5", "mine", "random_b0.5"]
    assert saved[0]["visual_tokens_llm_input"] == 32
    assert saved[2]["policy"] == "projector.out=uniform(keep=0.25)" and saved[2]["acc_loglik"] == 0.75
    table = (out / "sweep.md").read_text()
    for cell in ("| fastv | 0.5 |", "| random | 0.5 |", "| mine |", "| baseline |"):
        assert cell in table
    assert table.count("| baseline |") == 1


def test_sweep_table_keeps_this_invocations_order(tmp_path, capsys):
    """its own run directories (already holding summary.json when the table is written) are not
    re-read as earlier runs: the table keeps the planned order, not the folders' alphabetical one"""
    from tokenreduce.eval.sweep import write_outputs
    out = tmp_path / "sweep"
    summary = {"n": 4, "errors": 0, "loglik": 0.75, "generated": 0.5, "visual_tokens": {"llm_input": 9, "final": 9},
               "flops_fraction": 0.4, "prefill_ms": 1.0, "ttft_ms": 2.0, "decode_ms_per_token": 0.5,
               "loadavg_end": [0, 0, 0]}
    for d in ("zeta", "alpha"):
        (out / d).mkdir(parents=True)
        (out / d / "summary.json").write_text(json.dumps(summary))
    rows = write_outputs([_row("zeta", "zeta", None, 9), _row("alpha", "alpha", None, 9)], out)
    assert [r["label"] for r in rows] == ["zeta", "alpha"]


# -- 8: model specs for `sites` -------------------------------------------------------------------
def test_sites_model_spec_errors_list_the_forms(tmp_path, capsys):
    err = _error(capsys, ["sites", "foo"])
    assert "unknown model 'foo'" in err
    for form in ("timm:NAME", "open_clip:NAME", "hf:PRESET", "config.json", "torchvision:swin3d_t", "embedded"):
        assert form in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    err = _error(capsys, ["sites", f"hf:{bad}"])
    assert str(bad) in err and "not valid JSON" in err
    err = _error(capsys, ["sites", f"hf:{tmp_path / 'none.json'}"])
    assert "no such file" in err and "tiny-clip" in err
    err = _error(capsys, ["sites", f"embedded:{tmp_path}"])
    assert "no embedded model" in err


def test_sites_of_the_embedded_model(capsys):
    assert main(["sites", "embedded"]) == 0
    out = capsys.readouterr().out
    assert "llm.layer.{0.." in out and "projector.out" in out and "frames" in out


# -- 9: interrupts and OS errors -----------------------------------------------------------------
def test_interrupt_and_os_errors_are_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    def denied(args):
        raise PermissionError(13, "Permission denied", "out/x.json")
    monkeypatch.setattr(cli, "cmd_methods", interrupted)
    assert main(["methods"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    monkeypatch.setattr(cli, "cmd_methods", denied)
    err = _error(capsys, ["methods"])
    assert "Permission denied" in err and "out/x.json" in err


# -- benchmarks: refused before any work, with the flag named --------------------------------------
def test_bench_and_quality_refuse_bad_outputs_and_inputs_before_running(capsys, tmp_path, monkeypatch):
    from tokenreduce.eval import bench, quality
    monkeypatch.setattr(bench, "bench_vit", lambda *a, **k: pytest.fail("ran before refusing"))
    monkeypatch.setattr(quality, "run", lambda *a, **k: pytest.fail("ran before refusing"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    err = _error(capsys, ["bench", "vit", "--json", str(tmp_path)])
    assert "--json" in err and "is a folder; give a file path" in err
    err = _error(capsys, ["bench", "vit", "--json", str(a_file / "r.json")])
    assert "--json" in err and "is a file, not a folder" in err
    err = _error(capsys, ["bench", "vit", "--policy", " "])
    assert "--policy is empty" in err and "leave --policy out for the default" in err
    err = _error(capsys, ["bench", "video", "--model", "nosuch"])
    assert "--model must be videomae or swin" in err
    err = _usage_error(capsys, ["quality", "--out", str(a_file / "q"), "--quick"])
    assert "tokenreduce quality: error: --out" in err and "is a file, not a folder" in err


def test_bench_vit_names_the_benchmark_a_vlm_belongs_to(capsys):
    err = _error(capsys, ["bench", "vit", "--model", "hf:tiny-llava", "--runs", "1", "--warmup", "0", "--batch", "1"])
    assert "bench vit times an image encoder" in err and "use bench vlm" in err


def test_a_missing_optional_dependency_names_the_extra(monkeypatch, capsys):
    """a base install without transformers printed a ModuleNotFoundError traceback"""
    def missing(args):
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")

    def inner(args):  # our own module missing (a broken install) stays a traceback: no extra fixes it
        raise ModuleNotFoundError("No module named 'tokenreduce.adapters'", name="tokenreduce.adapters")
    monkeypatch.setattr(cli, "cmd_methods", missing)
    assert main(["methods"]) == 2
    assert "needs transformers, which is not installed (pip install 'tokenreduce[hf]'" in capsys.readouterr().err
    monkeypatch.setattr(cli, "cmd_methods", inner)
    with pytest.raises(ModuleNotFoundError):
        main(["methods"])
