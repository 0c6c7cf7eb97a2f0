"""The video-QA evaluation runner (eval/videoqa.py) and sweeps (eval/sweep.py) on a random-init
embedded LLaVA-OneVision and tiny synthetic clips: resume after a kill, bad records, scoring
against a direct computation on the model, sharding, sweep outputs."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenreduce.eval import cli  # noqa: E402
from tokenreduce.eval.embedded import ASSET_DIR, build_config, build_model, build_tokenizer  # noqa: E402
from tokenreduce.eval.synthetic import write_dataset  # noqa: E402
from tokenreduce.eval.videoqa import (EvalConfig, check_out_dir, done_ids, load_qa_model, lock_run_dir,  # noqa: E402
                                      merge_results, parse_choice, prepare_out_dir, read_results, repair_truncated, run_eval,
                                      shard)

FRAMES = 4         # frames the model sees
VIDEO_FRAMES = 6   # frames in each clip (synthetic's first_color needs >= 5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """a random-init embedded model saved as a directory (what --model embedded:DIR loads)"""
    d = tmp_path_factory.mktemp("embedded_random")
    tok = build_tokenizer()
    build_model(build_config(tok)).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synthetic"), 6, frames=VIDEO_FRAMES)


@pytest.fixture(scope="module")
def qa(model_dir):
    torch.set_num_threads(1)
    return load_qa_model(f"embedded:{model_dir}")


def _cfg(data, out, model_dir, **kw):
    return EvalConfig(data=str(data), out=str(out), model=f"embedded:{model_dir}", frames=FRAMES, progress=False,
                      warmup=0, **kw)


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory, data, model_dir, qa):
    out = tmp_path_factory.mktemp("baseline")
    summary = run_eval(_cfg(data, out, model_dir), qa=qa)
    return out, summary


PRED_KEYS = ("loglik_pred", "loglik_correct", "generated", "generated_pred", "generated_correct", "answer")


def test_kill_and_resume_equals_uninterrupted(tmp_path, data, model_dir, qa, baseline_run):
    full_dir, _ = baseline_run
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tokenreduce.eval.cli", "eval", "videoqa", "--model", f"embedded:{model_dir}",
           "--data", str(data), "--frames", str(FRAMES), "--out", str(out), "--no-progress", "--threads", "1",
           "--warmup", "0", "--stop-after", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    raw = (out / "results.jsonl").read_bytes()
    assert raw.count(b"\n") == 2 and not raw.endswith(b"\n")  # died in the middle of the third line
    assert len(read_results(out / "results.jsonl")) == 2

    summary = run_eval(_cfg(data, out, model_dir), qa=qa)
    lines = (out / "results.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]  # every line parses: the partial one was cut
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 6
    full = {r["id"]: r for r in read_results(full_dir / "results.jsonl")}
    assert set(full) == set(ids)
    for r in rows:
        f = full[r["id"]]
        assert {k: r[k] for k in PRED_KEYS} == {k: f[k] for k in PRED_KEYS}
        np.testing.assert_allclose(r["loglik_scores"], f["loglik_scores"], atol=1e-4)
        assert r["frames"] == f["frames"] and r["visual_tokens"] == f["visual_tokens"]
    assert summary["n"] == 6 and summary["errors"] == 0

    # a third run has nothing left to do and changes nothing
    run_eval(_cfg(data, out, model_dir), qa=qa)
    assert (out / "results.jsonl").read_text().splitlines() == lines


def test_resume_with_other_config_is_refused(tmp_path, data, model_dir, baseline_run):
    full_dir, _ = baseline_run
    other = _cfg(data, full_dir, model_dir, policy="projector.out=random(keep=0.5)")
    with pytest.raises(ValueError, match="another config.*policy"):
        check_out_dir(other)
    with pytest.raises(ValueError, match="frames"):
        check_out_dir(EvalConfig(data=str(data), out=str(full_dir), model=f"embedded:{model_dir}", frames=2))
    check_out_dir(_cfg(data, full_dir, model_dir, limit=3, batch=2))  # limit / batch may change
    check_out_dir(_cfg(data, full_dir, model_dir, policy="projector.out=random(keep=0.5)", overwrite=True))


def test_a_second_run_into_a_directory_in_use_is_refused_and_writes_nothing(tmp_path, data, model_dir, qa):
    """two runs appending to one results.jsonl (and one rewriting it while the other appends)
    would mix their rows: the run directory is locked while a run writes"""
    out = tmp_path / "run"
    holder = lock_run_dir(out)  # what a running eval holds (a separate open file: flock conflicts in-process too)
    try:
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {os.getpid()}\).*another --out"):
            run_eval(_cfg(data, out, model_dir, limit=2, scoring="loglik"), qa=qa)
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]
    finally:
        holder.close()
    # released: the same command now runs, and a lock file left behind does not make the
    # directory look like a stranger's
    assert run_eval(_cfg(data, out, model_dir, limit=2, scoring="loglik"), qa=qa)["n"] == 2
    assert run_eval(_cfg(data, out, model_dir, limit=2, scoring="loglik"), qa=qa)["n"] == 2


def test_summary_counts_this_runs_records_only(tmp_path, data, model_dir, qa):
    """rows an earlier run wrote beyond this run's --limit, or for a malformed line since fixed,
    stay in results.jsonl (a later run may resume them) but are not in this run's summary"""
    out = tmp_path / "run"
    assert run_eval(_cfg(data, out, model_dir, limit=4, scoring="loglik"), qa=qa)["n"] == 4
    small = run_eval(_cfg(data, out, model_dir, limit=2, scoring="loglik"), qa=qa)
    rows = read_results(out / "results.jsonl")
    assert small["n"] == 2 and len(rows) == 4
    assert small["loglik"] == pytest.approx(sum(r["loglik_correct"] for r in rows[:2]) / 2)
    # a malformed line, then the same file with the line fixed
    records = [json.loads(x) for x in Path(data).read_text().splitlines()[:3]]
    (tmp_path / "videos").symlink_to(Path(data).parent / "videos")
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:2] + [dict(records[2], options="red")]))
    out2 = tmp_path / "run2"
    assert run_eval(_cfg(path, out2, model_dir, scoring="loglik"), qa=qa)["errors"] == 1
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    again = run_eval(_cfg(path, out2, model_dir, scoring="loglik"), qa=qa)
    assert again["n"] == 3 and again["errors"] == 0


def test_resume_after_the_weights_changed_is_refused(tmp_path, data, model_dir):
    """a retrained model keeps its directory: the weights' fingerprint is part of the run's identity"""
    import shutil

    from safetensors.torch import load_file, save_file
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    out = tmp_path / "run"
    run_eval(_cfg(data, out, d, limit=2))
    check_out_dir(_cfg(data, out, d))  # same weights: resumable
    (d / "training.json").write_text("{}")  # notes beside the weights do not count
    check_out_dir(_cfg(data, out, d))
    weights = load_file(str(d / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="another config.*weights"):
        check_out_dir(_cfg(data, out, d))


def test_bad_records_are_reported_and_the_run_goes_on(tmp_path, data, model_dir, qa):
    good = [json.loads(x) for x in Path(data).read_text().splitlines()][:2]
    # seeded noise: about 1 in 300 random byte strings opens as a container with no video stream,
    # which is reported as "contains no decodable video frames" instead (a flaky CI run)
    (tmp_path / "corrupt.mp4").write_bytes(random.Random(0).randbytes(3000))
    bad = [dict(good[0], id="missing", video="videos/does_not_exist.mp4"),
           dict(good[0], id="corrupt", video=str(tmp_path / "corrupt.mp4")),
           dict(good[0], id="bad-options", options="red")]
    ds = Path(data).parent / "with_bad.jsonl"
    ds.write_text("".join(json.dumps(r) + "\n" for r in [good[0], *bad, good[1]]))
    out = tmp_path / "out"
    summary = run_eval(_cfg(ds, out, model_dir), qa=qa)
    rows = {r["id"]: r for r in read_results(out / "results.jsonl")}
    assert "error" not in rows[good[0]["id"]] and "error" not in rows[good[1]["id"]]
    assert "no such file" in rows["missing"]["error"]
    assert "could not be decoded" in rows["corrupt"]["error"]
    malformed = [r for i, r in rows.items() if i.startswith("bad-options")]
    assert len(malformed) == 1 and "malformed record (line 4)" in malformed[0]["error"]
    assert "options" in malformed[0]["error"]
    assert summary["n"] == 5 and summary["errors"] == 3 and summary["scored"] == 2
    scored_right = sum(rows[g["id"]]["loglik_correct"] for g in good)
    assert summary["loglik"] == pytest.approx(scored_right / 5)  # errors count as wrong
    md = (out / "summary.md").read_text()
    assert "| 5 | 3 |" in md


def test_retry_errors_redoes_only_the_failed_samples(tmp_path, data, model_dir, qa):
    """a video copied in after the run: a plain resume keeps its error row, --retry-errors redoes
    it (and nothing else)"""
    good = [json.loads(x) for x in Path(data).read_text().splitlines()][:2]
    src = Path(data).parent / good[0]["video"]
    late = tmp_path / "late.mp4"
    ds = tmp_path / "late.jsonl"
    other = dict(good[1], video=str(Path(data).parent / good[1]["video"]))
    ds.write_text("".join(json.dumps(r) + "\n" for r in [dict(good[0], id="late", video=str(late)), other])
                  + '{"id": "broken"}\n')  # a malformed line: its error row is never redone
    out = tmp_path / "out"
    assert run_eval(_cfg(ds, out, model_dir, scoring="loglik"), qa=qa)["errors"] == 2
    late.write_bytes(src.read_bytes())
    assert run_eval(_cfg(ds, out, model_dir, scoring="loglik"), qa=qa)["errors"] == 2
    lines = (out / "results.jsonl").read_text().splitlines()
    assert run_eval(_cfg(ds, out, model_dir, scoring="loglik", retry_errors=True), qa=qa)["errors"] == 1
    added = (out / "results.jsonl").read_text().splitlines()[len(lines):]
    assert [json.loads(x)["id"] for x in added] == ["late"]
    run_eval(_cfg(ds, out, model_dir, scoring="loglik", retry_errors=True), qa=qa)
    assert len((out / "results.jsonl").read_text().splitlines()) == len(lines) + 1  # nothing left to retry


def test_clip_bounds_in_meta_restrict_the_sampled_frames(tmp_path, data, model_dir, qa):
    """meta.start / meta.end (seconds, MVBench's bounds) select the frames sampled from; the
    synthetic clips run at 4 fps, so 0.25-0.75 s is frames 1..3"""
    rec = json.loads(Path(data).read_text().splitlines()[0])
    rec = dict(rec, video=str(Path(data).parent / rec["video"]), meta={**rec["meta"], "start": 0.25, "end": 0.75})
    ds = tmp_path / "bounded.jsonl"
    ds.write_text(json.dumps(rec) + "\n")
    for extra in ({}, dict(frame_select="uniform", candidates=FRAMES + 1)):
        out = tmp_path / f"out{len(extra)}"
        run_eval(_cfg(ds, out, model_dir, scoring="loglik", **extra), qa=qa)
        row = read_results(out / "results.jsonl")[0]
        assert "error" not in row and row["frames"]["window"] == [1, 3]
        assert len(row["frames"]["indices"]) == FRAMES and set(row["frames"]["indices"]) <= {1, 2, 3}

    # the same clip as a folder of frames (MVBench's TVQA layout) at its rate meta.fps: same frames, same scores
    from PIL import Image

    from tokenreduce.eval.video import read_frames
    frames, _ = read_frames(rec["video"])
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i + 1:05d}.png")
    ds.write_text(json.dumps(dict(rec, video=str(folder), meta={**rec["meta"], "fps": 4})) + "\n")
    run_eval(_cfg(ds, tmp_path / "folder", model_dir, scoring="loglik"), qa=qa)
    row = read_results(tmp_path / "folder" / "results.jsonl")[0]
    video_row = read_results(tmp_path / "out0" / "results.jsonl")[0]
    assert row["frames"] == video_row["frames"] and row["loglik_scores"] == video_row["loglik_scores"]
    # meta.fps is a frame folder's rate; on a video file it is ignored (free-form meta may carry one)
    ds.write_text(json.dumps(dict(rec, meta={**rec["meta"], "fps": "30"})) + "\n")
    run_eval(_cfg(ds, tmp_path / "filefps", model_dir, scoring="loglik"), qa=qa)
    assert "error" not in read_results(tmp_path / "filefps" / "results.jsonl")[0]
    # seconds without a rate are refused for that sample
    ds.write_text(json.dumps(dict(rec, video=str(folder))) + "\n")
    run_eval(_cfg(ds, tmp_path / "norate", model_dir, scoring="loglik"), qa=qa)
    assert "give its rate as meta.fps" in read_results(tmp_path / "norate" / "results.jsonl")[0]["error"]


def test_scores_match_a_direct_computation(data, qa, baseline_run):
    from tokenreduce.eval.video import read_frames
    full_dir, summary = baseline_run
    rows = {r["id"]: r for r in read_results(full_dir / "results.jsonl")}
    model, proc = qa.model, qa.processor
    recs = [json.loads(x) for x in Path(data).read_text().splitlines()][:2]
    for rec in recs:
        frames, _ = read_frames(Path(data).parent / rec["video"], num_frames=FRAMES)
        inputs = proc(text=proc.prompt(rec["question"], rec["options"]), videos=[frames])
        with torch.no_grad():
            lp = torch.log_softmax(model(**inputs).logits[0, -1].float(), -1)
            gen = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
        ids = [proc.tokenizer.convert_tokens_to_ids(o) for o in rec["options"]]
        expect = [float(lp[i]) for i in ids]
        r = rows[rec["id"]]
        np.testing.assert_allclose(r["loglik_scores"], expect, atol=1e-4)
        assert r["loglik_pred"] == int(np.argmax(expect))
        text = proc.decode(gen[0, inputs["input_ids"].shape[1]:])
        assert r["generated"] == text and r["generated_pred"] == parse_choice(text, rec["options"])
        assert r["visual_tokens"]["input"] == r["visual_tokens"]["final"] == FRAMES * 16 + 1
        assert r["flops_fraction"] == 1.0 and r["prefill_ms"] > 0 and r["ttft_ms"] > 0
        assert r["decode_ms_per_token"] > 0 and r["kv_bytes"] > 0
    assert set(summary["by_category"]["qtype"]) == {"region_color", "first_color", "start_end", "count",
                                                    "brief_color"}


def test_multi_token_continuations_sum_token_logprobs(data, qa):
    """letter_option ("A red") is two tokens: scored by a batched prompt + option forward."""
    from tokenreduce.eval.video import read_frames
    from tokenreduce.eval.videoqa import option_logliks
    rec = json.loads(Path(data).read_text().splitlines()[0])
    frames, _ = read_frames(Path(data).parent / rec["video"], num_frames=FRAMES)
    proc, model = qa.processor, qa.model
    prompt = qa.prompt(rec["question"], rec["options"])
    conts = [qa.continuation(rec["options"], j, "letter_option") for j in range(4)]
    got = option_logliks(qa, None, None, [prompt], [conts], [{"frames": frames}])[0]
    for c, score in zip(conts, got):
        inputs = proc(text=prompt + " " + c, videos=[frames])
        with torch.no_grad():
            lp = torch.log_softmax(model(**inputs).logits[0].float(), -1)
        ids = inputs["input_ids"][0]
        n = len(proc.tokenizer(c, add_special_tokens=False)["input_ids"])
        assert n > 1
        L = len(ids)
        direct = sum(float(lp[p - 1, ids[p]]) for p in range(L - n, L))
        assert score == pytest.approx(direct, abs=1e-4)


def test_parse_choice():
    opts = ["red", "top-left", "Two birds", "two"]
    assert parse_choice("B", opts) == 1
    assert parse_choice("(C) Two birds", opts) == 2
    assert parse_choice("D.", opts) == 3
    assert parse_choice("top-left answer :", opts) == 1
    assert parse_choice("two birds fly", opts) == 2  # the longest matching option
    assert parse_choice("TWO", opts) == 3
    assert parse_choice("reddish", opts) == -1
    assert parse_choice("E", opts) == -1  # a letter past the options
    assert parse_choice("", opts) == -1


def test_shard_merge_and_truncation(tmp_path):
    items = list(range(7))
    assert shard(items, 0, 2) + shard(items, 1, 2) == [0, 2, 4, 6, 1, 3, 5]
    (tmp_path / "results.jsonl").write_text('{"id": "a"}\n')
    (tmp_path / "results.rank0.jsonl").write_text('{"id": "c"}\n{"id": "a", "dup": 1}\n')
    (tmp_path / "results.rank1.jsonl").write_text('{"id": "b"}\n{"id": "d", "x": ')  # killed mid-write
    assert done_ids(tmp_path) == {"a", "b", "c"}
    assert repair_truncated(tmp_path / "results.rank1.jsonl")
    assert (tmp_path / "results.rank1.jsonl").read_text() == '{"id": "b"}\n'
    rows = merge_results(tmp_path, order=["a", "b", "c", "d"])
    # the last row per id wins (a redone record is appended after its stale row), in first-seen order
    assert [r["id"] for r in rows] == ["a", "b", "c"] and rows[0]["dup"] == 1
    assert not list(tmp_path.glob("results.rank*"))
    assert [r["id"] for r in read_results(tmp_path / "results.jsonl")] == ["a", "b", "c"]


def test_done_hashes_latest_row_wins_and_old_rows_without_a_hash_count_as_done(tmp_path):
    from tokenreduce.eval.videoqa import done_hashes, is_done, record_hash
    rec = {"id": "a", "video": "/v.mp4", "question": "q?", "options": ["x", "y"], "answer": 0, "meta": {}}
    h = record_hash(rec)
    for changed in ({"answer": 1}, {"question": "q2?"}, {"options": ["x", "z"]}, {"video": "/w.mp4"},
                    {"meta": {"qtype": "count"}}):
        assert record_hash({**rec, **changed}) != h, changed
    (tmp_path / "results.jsonl").write_text(
        '{"id": "old"}\n'  # written before rows had a hash
        f'{{"id": "a", "record_hash": "stale"}}\n{{"id": "a", "record_hash": "{h}"}}\n')
    done = done_hashes(tmp_path)
    assert done == {"old": None, "a": h}
    assert is_done(done, "old", "anything") and is_done(done, "a", h)
    assert not is_done(done, "a", "stale") and not is_done(done, "new", h)


def test_frame_selection_with_the_same_model_records_indices(tmp_path, data, model_dir, qa):
    # dycoke_ttm refuses single frames, so this also checks that the vlm scorer's per-frame
    # forwards run on the unreduced model
    out = tmp_path / "fs"
    cfg = _cfg(data, out, model_dir, limit=2, frame_select="vlm", policy="projector.out=dycoke_ttm(ratio=0.5)")
    cfg.frames = 2
    summary = run_eval(cfg, qa=qa)
    assert summary["errors"] == 0
    for r in read_results(out / "results.jsonl"):
        f = r["frames"]
        assert f["selected_by"] == "vlm" and f["candidates"] == list(range(VIDEO_FRAMES))
        assert len(f["indices"]) == 2 and set(f["indices"]) <= set(f["candidates"])
        assert r["visual_tokens"]["llm_input"] < r["visual_tokens"]["input"]  # the policy was back on


def test_sweep_writes_table_and_plots(tmp_path, data, model_dir):
    out = tmp_path / "sweep"
    rc = cli.main(["eval", "sweep", "--model", f"embedded:{model_dir}", "--data", str(data), "--frames",
                   str(FRAMES), "--out", str(out), "--methods", "fastv,random", "--budgets", "0.5", "--limit", "4",
                   "--no-progress", "--warmup", "0", "--scoring", "loglik"])
    assert rc == 0
    table = (out / "sweep.md").read_text()
    for label in ("| baseline |", "| fastv | 0.5 |", "| random | 0.5 |", "projector.out=random"):
        assert label in table
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["label"] for r in rows] == ["baseline", "fastv_b0.5", "random_b0.5"]
    assert rows[2]["visual_tokens_llm_input"] == pytest.approx((FRAMES * 16 + 1) / 2, abs=1)
    assert all(r["n"] == 4 for r in rows)
    for png in ("accuracy_vs_tokens.png", "speed_vs_tokens.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["baseline", "fastv_b0.5", "random_b0.5"]


def test_sweep_refuses_a_policy_the_model_cannot_host_before_any_run(tmp_path, data, model_dir, capsys):
    """a site the model lacks is found when the model is loaded, not as a failed row after the
    baseline and the runs before it took their time"""
    out = tmp_path / "sweep"
    rc = cli.main(["eval", "sweep", "--model", f"embedded:{model_dir}", "--data", str(data), "--frames",
                   str(FRAMES), "--out", str(out), "--methods", "fastv", "--budgets", "0.5", "--limit", "2",
                   "--no-progress", "--warmup", "0", "--scoring", "loglik",
                   "--policies", '{"deep": "llm.layer.40=fastv(ratio=0.5)"}'])
    err = capsys.readouterr().err
    assert rc != 0
    assert "run 'deep'" in err and "llm.layer.40" in err and "nothing was run" in err
    assert not out.exists() or not any(out.iterdir())


def _sweep(model_dir, data, out, *extra):
    return cli.main(["eval", "sweep", "--model", f"embedded:{model_dir}", "--data", str(data), "--frames", str(FRAMES),
                     "--out", str(out), "--limit", "2", "--no-progress", "--warmup", "0", "--scoring", "loglik",
                     "--no-baseline", *extra])


def test_sweep_is_locked_and_a_refused_rerun_keeps_the_finished_rows(tmp_path, data, model_dir, capsys):
    out = tmp_path / "sweep"
    holder = lock_run_dir(out)  # another sweep writing there
    try:
        assert _sweep(model_dir, data, out, "--methods", "random", "--budgets", "0.5") != 0
        assert "in use by another run" in capsys.readouterr().err
        assert not (out / "random_b0.5").exists()
    finally:
        holder.close()
    assert _sweep(model_dir, data, out, "--methods", "random", "--budgets", "0.5") == 0
    capsys.readouterr()
    # the same run with another config is refused: exit 1, and its finished row stays in the table
    assert _sweep(model_dir, data, out, "--methods", "random", "--budgets", "0.5", "--seed", "1") == 1
    assert "1 of 1 runs failed: random_b0.5" in capsys.readouterr().err
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["label"] for r in rows] == ["random_b0.5"] and "failed" not in rows[0] and rows[0]["n"] == 2
    # --overwrite clears the run's directory first: when that rerun fails, its failed row replaces the old one
    assert _sweep(model_dir, data, out, "--methods", "random", "--budgets", "0.5", "--overwrite",
                  "--frame-select", "head", "--scorer-args", '{"bogus": 1}') == 1
    rows = json.loads((out / "sweep.json").read_text())
    assert "failed" in rows[0] and not (out / "random_b0.5" / "summary.json").exists()


def test_sweep_refuses_a_missing_dataset_and_labels_that_are_its_own_outputs(tmp_path, model_dir, capsys):
    out = tmp_path / "sweep"
    assert _sweep(model_dir, tmp_path / "typo.jsonl", out, "--methods", "random", "--budgets", "0.5") != 0
    assert "typo.jsonl" in capsys.readouterr().err and not out.exists()
    from tokenreduce.eval.sweep import plan_runs
    for label in ("sweep.json", ""):
        with pytest.raises(ValueError, match="which the sweep writes itself"):
            plan_runs([], [], 8, {label: "llm.layer.2=fastv"})


def test_plot_lines_join_extra_runs_labelled_like_a_methods_own():
    from tokenreduce.eval.sweep import _line_of
    assert [_line_of(m) for m in ("fastv", "fastv_b0.25", "random_b0.1", "fastv_least_b0.5", "mine_b0.3")] == \
        ["fastv", "fastv", "random", "fastv_least_b0.5", "mine_b0.3"]


def test_sweep_method_table_errors_name_valid_choices():
    from tokenreduce.eval.sweep import SWEEP_METHODS, plan_runs
    runs = plan_runs(["fastv", "atp"], [0.25, 0.5], frames=8)
    assert [r[0] for r in runs] == ["baseline", "fastv_b0.25", "fastv_b0.5", "atp_b0.25", "atp_b0.5"]
    assert runs[1][3] == "llm.layer.2=fastv(ratio=0.75)"
    # ATP's fixed rule keeps z > alpha: alpha = Phi^-1(1 - budget) (0 keeps half)
    assert [r[3] for r in runs[3:]] == ["llm.layer.2=atp(alpha=0.6745)", "llm.layer.2=atp"]
    with pytest.raises(ValueError, match="visionzip.*CLS.*valid: .*fastv"):
        plan_runs(["visionzip"], [0.5], frames=8)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        SWEEP_METHODS["random"].spec(1.5, 8)
    # every run has its own directory: labels that make the same file-safe name are refused
    with pytest.raises(ValueError, match="'a_b' and 'a b' would use the directory 'a_b'"):
        plan_runs([], [], 8, {"a b": "llm.layer.2=fastv", "a_b": "projector.out=random"})
    with pytest.raises(ValueError, match="would use the directory '..'"):
        plan_runs([], [], 8, {"..": "llm.layer.2=fastv"})


def test_report_budgets_and_its_controls(capsys):
    from tokenreduce.eval.videoqa_report import CONTROLS, report_runs
    labels = [r[0] for r in report_runs("0.25,0.5")]
    assert labels.count("fastv_b0.25") == 1 and set(CONTROLS) <= set(labels)
    assert len(labels) == len(set(labels))
    for bad, msg in (("0.3,x", "give fractions of the visual tokens kept"), ("1.5", r"\(0, 1\]")):
        assert cli.main(["eval", "report", "--out", "unused", "--budgets", bad]) == 2
        assert re.search(msg, capsys.readouterr().err)


def test_hf_checkpoint_with_its_processor(tmp_path, data):
    """--model hf:DIR: a real LlavaOnevisionProcessor (chat template, video processor) saved next to
    a tiny model, loaded back through AutoProcessor / AutoModelForImageTextToText. Its tokenizer
    pads on the right: batches must score as single samples do all the same."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor
    tok = build_tokenizer()
    tok.padding_side = "right"
    template = ("{% for m in messages %}{{ m['role'] }} {% for c in m['content'] %}{% if c['type'] == 'video' %}"
                "<video>{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT :{% endif %}")
    size = {"height": 64, "width": 64}
    proc = LlavaOnevisionProcessor(image_processor=LlavaOnevisionImageProcessor(size=size, crop_size=size,
                                                                                image_grid_pinpoints=[[64, 64]]),
                                   video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=tok,
                                   chat_template=template, num_image_tokens=64, vision_feature_select_strategy="full")
    ckpt = tmp_path / "hf"
    proc.save_pretrained(str(ckpt))
    build_model(build_config(tok)).save_pretrained(str(ckpt))
    out = tmp_path / "out"
    summary = run_eval(EvalConfig(data=str(data), out=str(out), model=f"hf:{ckpt}", frames=FRAMES, limit=2,
                                  progress=False, warmup=0, policy="projector.out=uniform(keep=0.5)",
                                  max_new_tokens=2))
    assert summary["errors"] == 0 and summary["n"] == 2
    for r in read_results(out / "results.jsonl"):
        assert r["loglik_continuations"] == ["A", "B", "C", "D"]  # hf default: the letter
        assert r["visual_tokens"]["input"] == FRAMES * 16 + 1
        assert r["visual_tokens"]["llm_input"] == pytest.approx((FRAMES * 16 + 1) / 2, abs=1)
    runs = {}
    for batch in (1, 2):
        run_eval(EvalConfig(data=str(data), out=str(tmp_path / f"b{batch}"), model=f"hf:{ckpt}", frames=FRAMES,
                            limit=3, progress=False, warmup=0, max_new_tokens=2, batch=batch))
        runs[batch] = read_results(tmp_path / f"b{batch}" / "results.jsonl")
    for one, two in zip(runs[1], runs[2]):
        assert one["id"] == two["id"] and one["generated"] == two["generated"]
        assert one["loglik_scores"] == pytest.approx(two["loglik_scores"], abs=1e-3)
    with pytest.raises(ValueError, match="valid forms: embedded"):
        load_qa_model("llava:somewhere")


def test_cli_convert_is_wired(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "--help"])
    assert e.value.code == 0
    assert "nextqa" in capsys.readouterr().out


@pytest.mark.skipif(not (ASSET_DIR / "model.safetensors").exists(), reason="trained embedded weights not shipped yet")
@pytest.mark.parametrize("qtypes,n,need", [(["brief_color", "first_color"], 8, 7),
                                           (["region_color"], 16, 12)])
def test_trained_embedded_model_answers_synthetic_questions(tmp_path, qtypes, n, need):
    """the shipped model on fresh clips (a seed it was not scored on) of the question types it
    answers at >= 95% held-out (README: per-type accuracy); both scorings pick the answer. Chance
    is 1 in 4; region_color needs the right token at the right frame."""
    ds = write_dataset(tmp_path / "data", n, seed=777, frames=8, qtypes=qtypes)
    summary = run_eval(EvalConfig(data=str(ds), out=str(tmp_path / "out"), model="embedded", frames=8,
                                  progress=False, warmup=0, max_new_tokens=2))
    assert summary["errors"] == 0
    assert summary["loglik"] >= need / n, summary
    assert summary["generated"] >= need / n, summary


@pytest.mark.parametrize("kw,match", [
    (dict(model="llava"), "valid forms: embedded"),
    (dict(scoring="loglik,votes"), "choose from: loglik, generate"),
    (dict(dtype="fp8"), "choose one of: float32, float16, bfloat16"),
    (dict(device="gpu0"), "valid forms: cpu, cuda, cuda:N"),
    (dict(frames=0), "--frames must be >= 1"),
    (dict(frame_select="oracle"), "choose one of: "),
    (dict(frame_select="uniform", candidates=4), r"--candidates \(4\) must be >= --frames \(8\)"),
    (dict(frames=2.5), r"--frames must be an integer >= 1, got 2.5"),
    (dict(frames="8"), r"--frames must be an integer >= 1, got '8'"),
    (dict(frames=True), r"--frames must be an integer >= 1, got True"),
    (dict(batch=1.7), r"--batch must be an integer >= 1"),
    (dict(limit=2.5), r"--limit must be an integer >= 0 or None"),
    (dict(limit="5"), r"--limit must be an integer >= 0 or None"),
    (dict(candidates="x"), r"--candidates must be an integer >= 1 or None"),
    (dict(seed="x"), r"--seed must be an integer >= 0"),
    (dict(warmup=-5), r"--warmup must be >= 0, got -5"),
    (dict(max_new_tokens=0), r"--max-new-tokens must be >= 1"),
    (dict(scoring=None), "choose from: loglik, generate|sequence of: loglik, generate"),
    (dict(out=""), "--out must be a directory path"),
    (dict(scorer_args="{}"), "--scorer-args must be a JSON object"),
])
def test_bad_run_options_name_the_valid_choices(tmp_path, kw, match):
    """checked when the config is made: before run.json is written or a model is loaded"""
    with pytest.raises(ValueError, match=match):
        EvalConfig(**{"data": "d.jsonl", "out": str(tmp_path / "o"), "frames": 8, **kw})
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_says_so(tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available on this machine; use --device cpu"):
        EvalConfig(data="d.jsonl", out=str(tmp_path / "o"), device="cuda")


def test_parse_choice_reads_option_text_before_a_leading_letter():
    opts = ["a woman is singing", "a man is running"]
    assert parse_choice("A man is running.", opts) == 1 and parse_choice("A", opts) == 0
    assert parse_choice("B. something else", opts) == 1
    from tokenreduce.eval.lmms_plugin import parse_choice as plugin_choice
    assert plugin_choice("A man is running.", opts) == 1 and plugin_choice("B", opts) == 1


def test_accuracy_is_zero_not_missing_when_every_sample_failed():
    from tokenreduce.eval.videoqa_summary import _accuracy
    rows = [{"id": "a", "error": "boom"}, {"id": "b", "error": "boom"}]
    acc = _accuracy(rows, ("loglik",))
    assert acc["loglik"] == 0.0 and acc["generated"] is None and acc["errors"] == 2


def test_multi_token_options_score_every_token_after_a_prompt_ending_in_a_space():
    """byte-level BPE: "ASSISTANT: " ends in a lone space token that " red" would absorb; the
    space moves into the continuation, so "red circle" is scored as two tokens (Ġred Ġcircle),
    not one. A model with flat logits scores each option as -(tokens) x log V."""
    import math
    from types import SimpleNamespace

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tokenreduce.eval.videoqa import option_logliks
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["ASSISTANT: red circle", "ASSISTANT: two blue squares", "what is it ? ASSISTANT: green"] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>")
    V = len(tok)

    def inputs(texts, frames):
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        L = max(map(len, ids))
        return {"input_ids": torch.tensor([[tok.pad_token_id] * (L - len(x)) + x for x in ids])}
    model = lambda input_ids, **_: SimpleNamespace(logits=torch.zeros(*input_ids.shape, V))  # noqa: E731
    qa = SimpleNamespace(tokenizer=tok, inputs=inputs, model=model)
    prompt = "what is it ? ASSISTANT: "
    scores = option_logliks(qa, None, None, [prompt], [["red circle", "two blue squares"]], [{"frames": None}])
    expect = [len(tok("ASSISTANT: " + c)["input_ids"]) - len(tok("ASSISTANT:")["input_ids"]) for c in
              ("red circle", "two blue squares")]
    assert expect == [2, 3]
    assert scores[0] == pytest.approx([-n * math.log(V) for n in expect], rel=1e-5)


def test_kv_bytes_are_per_sample_whatever_the_batch(tmp_path, data, model_dir, qa):
    kv = {}
    for batch in (1, 2):
        s = run_eval(_cfg(data, tmp_path / f"b{batch}", model_dir, limit=4, scoring="generate", batch=batch,
                          max_new_tokens=2), qa=qa)
        kv[batch] = s["kv_bytes"]
    assert kv[2] == pytest.approx(kv[1], rel=0.1)  # padding may add a little; never x batch


def _one_record_dataset(tmp_path, data, **changes):
    """the synthetic set's first record, with changes, in a file of its own (same videos)"""
    rec = {**json.loads(Path(data).read_text().splitlines()[0]), **changes}
    if not (tmp_path / "videos").exists():
        (tmp_path / "videos").symlink_to(Path(data).parent / "videos")
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    return path, rec


def test_an_edited_record_is_redone_and_its_new_row_counts(tmp_path, data, model_dir, qa):
    path, rec = _one_record_dataset(tmp_path, data)
    out = tmp_path / "run"
    run_eval(_cfg(path, out, model_dir, scoring="loglik"), qa=qa)
    first = read_results(out / "results.jsonl")
    assert len(first) == 1
    # the answer changes so that the same prediction flips from right to wrong (or back): the
    # stale row is redone, and the new row is the one the summary counts
    pred = first[0]["loglik_pred"]
    new_answer = pred if not first[0]["loglik_correct"] else (pred + 1) % len(rec["options"])
    _one_record_dataset(tmp_path, data, answer=new_answer)
    summary = run_eval(_cfg(path, out, model_dir, scoring="loglik"), qa=qa)
    rows = read_results(out / "results.jsonl")
    assert len(rows) == 2 and rows[1]["answer"] == new_answer and rows[1]["loglik_pred"] == pred
    assert rows[0]["record_hash"] and rows[1]["record_hash"] != rows[0]["record_hash"]
    assert rows[1]["loglik_correct"] != rows[0]["loglik_correct"]
    assert summary["n"] == 1 and summary["loglik"] == float(rows[1]["loglik_correct"])
    # unchanged: nothing is redone; the question edited: redone again
    run_eval(_cfg(path, out, model_dir, scoring="loglik"), qa=qa)
    assert len(read_results(out / "results.jsonl")) == 2
    _one_record_dataset(tmp_path, data, answer=new_answer, question=rec["question"] + " now")
    run_eval(_cfg(path, out, model_dir, scoring="loglik"), qa=qa)
    rows = read_results(out / "results.jsonl")
    assert len(rows) == 3 and rows[2]["question"].endswith(" now")
    # rows an older version wrote (no record_hash) still count as done: old runs resume as before
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "run.json").write_text((out / "run.json").read_text())
    row = {k: v for k, v in rows[0].items() if k != "record_hash"}  # the first record's row
    (legacy / "results.jsonl").write_text(json.dumps(row) + "\n")
    s = run_eval(_cfg(path, legacy, model_dir, scoring="loglik"), qa=qa)
    assert read_results(legacy / "results.jsonl") == [row] and s["n"] == 1


def test_out_must_be_a_run_directory_and_overwrite_keeps_other_files(tmp_path, data, model_dir, qa):
    path, _ = _one_record_dataset(tmp_path, data)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.md").write_text("my own notes\n")
    (out / "notes.txt").write_text("keep me\n")
    with pytest.raises(ValueError, match="not empty and has no run.json.*--overwrite"):
        run_eval(_cfg(path, out, model_dir, scoring="loglik"), qa=qa)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "summary.md"]
    assert (out / "summary.md").read_text() == "my own notes\n"
    # --overwrite uses it: the run's own files are replaced, nothing else is touched
    run_eval(_cfg(path, out, model_dir, scoring="loglik", overwrite=True), qa=qa)
    assert (out / "notes.txt").read_text() == "keep me\n"
    assert (out / "summary.md").read_text() != "my own notes\n" and (out / "run.json").exists()
    check_out_dir(_cfg(path, out, model_dir, scoring="loglik"))  # a run directory now: resumable

    # --out naming a file, or under a file
    afile = tmp_path / "afile"
    afile.write_text("x")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=f"--out '{re.escape(str(afile))}' is a file, not a directory"):
            run_eval(_cfg(path, afile, model_dir, overwrite=overwrite), qa=qa)
    assert afile.read_text() == "x"
    with pytest.raises(ValueError, match=f"--out '{re.escape(str(afile / 'sub'))}': cannot create the directory"):
        run_eval(_cfg(path, afile / "sub", model_dir), qa=qa)

    # a damaged run.json
    for text, what in (("[1, 2]", "got list"), ("{not json", "JSONDecodeError")):
        bad = tmp_path / f"bad{len(text)}"
        bad.mkdir()
        (bad / "run.json").write_text(text)
        with pytest.raises(ValueError, match=rf"{re.escape(str(bad / 'run.json'))}: not a tokenreduce run.json "
                                             rf"\(.*{what}.*\); use another --out or --overwrite"):
            run_eval(_cfg(path, bad, model_dir, scoring="loglik"), qa=qa)
        assert (bad / "run.json").read_text() == text
    check_out_dir(_cfg(path, bad, model_dir, overwrite=True))


def test_a_dataset_without_valid_records_is_refused(tmp_path, model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(empty))}: no records \\(the file is empty\\)"):
        run_eval(_cfg(empty, tmp_path / "o1", model_dir))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=f"{re.escape(str(broken))}: no valid records; 2 malformed line.*"
                                         "line 1: .*; line 2: not valid JSON"):
        run_eval(_cfg(broken, tmp_path / "o2", model_dir))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_negative_threads_are_refused_before_torch_sees_them(tmp_path, capsys):
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "videoqa", "--data", "d.jsonl", "--out", str(tmp_path / "o"), "--threads", "-2"])
    assert e.value.code == 2
    assert "--threads: must be >= 0 (0 = torch's default), got -2" in capsys.readouterr().err
    assert torch.get_num_threads() == threads and not (tmp_path / "o").exists()
    from tokenreduce.eval.videoqa import check_threads
    with pytest.raises(ValueError, match="--threads must be >= 0"):
        check_threads(-1)


def test_ctrl_c_says_how_far_the_run_got(tmp_path, data, model_dir, qa, monkeypatch, capsys):
    from tokenreduce.eval import videoqa
    real, calls = videoqa.score_batch, []

    def score_then_interrupt(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(videoqa, "score_batch", score_then_interrupt)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_eval(_cfg(data, out, model_dir, limit=3, scoring="loglik"), qa=qa)
    err = capsys.readouterr().err
    assert f"interrupted: 1 of 3 results written to {out}; rerun the same command to resume" in err
    assert len(read_results(out / "results.jsonl")) == 1
    # the command line turns it into exit status 130, without a traceback
    monkeypatch.setattr(videoqa, "run_eval", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.main(["eval", "videoqa", "--data", str(data), "--out", str(tmp_path / "o")]) == 130


def test_a_policy_that_does_not_fit_leaves_no_run_behind(tmp_path, data, model_dir, qa):
    """a site the model does not have fails before the first result: the fresh run directory is
    taken away again, so the corrected command runs instead of being refused as another config"""
    out = tmp_path / "run"
    from tokenreduce.errors import TokenReduceError
    with pytest.raises(TokenReduceError, match="llm.layer.99"):
        run_eval(_cfg(data, out, model_dir, policy="llm.layer.99=fastv(ratio=0.5)", limit=2), qa=qa)
    assert not out.exists()
    summary = run_eval(_cfg(data, out, model_dir, policy="llm.layer.2=fastv(ratio=0.5)", limit=2), qa=qa)
    assert summary["n"] == 2
    # an existing run keeps its files whatever fails later
    with pytest.raises(ValueError, match="another config"):
        run_eval(_cfg(data, out, model_dir, policy="llm.layer.99=fastv(ratio=0.5)", limit=2), qa=qa)
    assert (out / "run.json").exists() and len(read_results(out / "results.jsonl")) == 2


class _Rank:
    """accelerate's state for one rank of a sharded run, run in this process"""

    def __init__(self, rank, world):
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0
        self.local_process_index = rank

    def wait_for_everyone(self):
        pass


def test_a_redone_record_wins_over_a_stale_shard_when_the_process_count_changes(tmp_path, data, model_dir, qa):
    """rank 1 of a 2-process run finished, rank 0 was killed (results.rank1.jsonl left unmerged);
    a record is edited and the run resumed on one process: the redone row counts, and a further
    unchanged rerun redoes nothing"""
    lines = Path(data).read_text().splitlines()[:4]
    (tmp_path / "videos").symlink_to(Path(data).parent / "videos")
    path = tmp_path / "four.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    prepare_out_dir(_cfg(path, out, model_dir, scoring="loglik"))
    run_eval(_cfg(path, out, model_dir, scoring="loglik"), qa=qa, state=_Rank(1, 2))
    assert (out / "results.rank1.jsonl").exists()
    rec = json.loads(lines[1])
    assert rec["id"] in {r["id"] for r in read_results(out / "results.rank1.jsonl")}
    rec["meta"]["qtype"] = "edited"
    lines[1] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    summary = run_eval(_cfg(path, out, model_dir, scoring="loglik"), qa=qa)
    assert summary["n"] == 4 and "edited" in summary["by_category"]["qtype"]
    n = len(read_results(out / "results.jsonl"))
    run_eval(_cfg(path, out, model_dir, scoring="loglik"), qa=qa)
    assert len(read_results(out / "results.jsonl")) == n


class _BarrierRank(_Rank):
    """one rank of a sharded run in a thread: wait_for_everyone is a real barrier"""

    def __init__(self, rank, world, barrier):
        super().__init__(rank, world)
        self.barrier = barrier

    def wait_for_everyone(self):
        self.barrier.wait(timeout=300)


def test_a_sharded_resume_shares_the_work_left_evenly(tmp_path, data, model_dir, qa):
    """rank 0 of a 2-process run finished its half, rank 1 died before writing: the resume splits
    the two samples left between both ranks (it left both to rank 1, the other rank waiting at the
    final barrier), and every sample ends with exactly one row"""
    import threading
    lines = Path(data).read_text().splitlines()[:4]
    (tmp_path / "videos").symlink_to(Path(data).parent / "videos")
    path = tmp_path / "four.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    cfg = _cfg(path, out, model_dir, scoring="loglik")
    run_eval(cfg, qa=qa, state=_Rank(0, 2))
    ids = [json.loads(x)["id"] for x in lines]
    assert sorted(r["id"] for r in read_results(out / "results.jsonl")) == sorted(ids[0::2])
    barrier = threading.Barrier(2)
    failures = []
    # a model per rank, loaded here: transformers' loading is not thread-safe
    models = {0: qa, 1: load_qa_model(cfg.model, "cpu", "float32")}

    def rank(i):
        try:
            run_eval(_cfg(path, out, model_dir, scoring="loglik"), qa=models[i], state=_BarrierRank(i, 2, barrier))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
            barrier.abort()
    threads = [threading.Thread(target=rank, args=(i,)) for i in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    rows = read_results(out / "results.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert {r["id"]: r["rank"] for r in rows if r["id"] in ids[1::2]} == {ids[1]: 0, ids[3]: 1}


def test_malformed_texts_are_per_line_problems(tmp_path, data, model_dir, qa):
    """options that repeat a text (the answer could never win over its twin) and a lone surrogate
    (valid JSON, not valid Unicode; it stopped the whole run) are reported per line"""
    rec = json.loads(Path(data).read_text().splitlines()[0])
    rec["video"] = str(Path(data).parent / rec["video"])
    twin = dict(rec, id="twin", options=[rec["options"][0], rec["options"][0] + " ", *rec["options"][2:]])
    ds = tmp_path / "d.jsonl"
    ds.write_text(json.dumps(rec) + "\n" + json.dumps(twin) + "\n"
                  + json.dumps(dict(rec, id="half")).replace('"question": "', '"question": "\\udc80', 1) + "\n"
                  + json.dumps(dict(rec, id="meta_half", meta={"qtype": "x"})).replace('"x"', '"\\udc80"') + "\n")
    summary = run_eval(_cfg(ds, tmp_path / "out", model_dir, scoring="loglik"), qa=qa)
    rows = {r["id"]: r for r in read_results(tmp_path / "out" / "results.jsonl")}
    assert summary["n"] == 4 and summary["errors"] == 3 and "error" not in rows[rec["id"]]
    assert "options 0 and 1 are the same text" in rows["twin@line2"]["error"]
    assert "lone UTF-16 surrogate" in rows["half@line3"]["error"]
    assert "lone UTF-16 surrogate" in rows["meta_half@line4"]["error"]  # it broke writing summary.md
    assert (tmp_path / "out" / "summary.md").stat().st_size > 0


def test_resumed_with_another_batch_times_only_this_runs_rows(tmp_path, data, model_dir, qa):
    """accuracy covers every row, but times and memory only the rows run with this --batch: a
    batch-4 row holds the whole batch's prefill time"""
    lines = Path(data).read_text().splitlines()[:6]
    (tmp_path / "videos").symlink_to(Path(data).parent / "videos")
    path = tmp_path / "six.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    run_eval(_cfg(path, out, model_dir, scoring="loglik", limit=2, batch=2), qa=qa)
    summary = run_eval(_cfg(path, out, model_dir, scoring="loglik"), qa=qa)
    rows = read_results(out / "results.jsonl")
    assert [r["batch"] for r in rows] == [2, 2, 1, 1, 1, 1] and summary["n"] == 6
    assert summary["timed_rows"] == 4
    assert summary["prefill_ms"] == pytest.approx(np.mean([r["prefill_ms"] for r in rows[2:]]))
    assert "times and memory over the 4 of 6 scored samples run with batch 1 on cpu" in \
        (out / "summary.md").read_text()
    # rows written before rows recorded their --batch count (their batch is unknown)
    from tokenreduce.eval.videoqa_summary import _ran_like
    legacy = {"batch_size": 3, "peak_mem_kind": "cpu_max_rss"}
    assert _ran_like(legacy, types.SimpleNamespace(batch=4, device="cpu"))
    assert not _ran_like(legacy, types.SimpleNamespace(batch=4, device="cuda"))
    # spelling out the embedded model's default continuation, or a setting the scoring does not
    # use, is the same config
    run_eval(_cfg(path, out, model_dir, scoring="loglik", continuation="option", max_new_tokens=3), qa=qa)
    with pytest.raises(ValueError, match="continuation: 'option' there, 'letter' now"):
        check_out_dir(_cfg(path, out, model_dir, scoring="loglik", continuation="letter"))
    # --candidates' default (4 x --frames) spelled out on a frame-selection rerun
    sel = tmp_path / "sel"
    run_eval(_cfg(path, sel, model_dir, scoring="loglik", limit=1, frame_select="uniform"), qa=qa)
    check_out_dir(_cfg(path, sel, model_dir, scoring="loglik", limit=1, frame_select="uniform",
                       candidates=4 * FRAMES))
    with pytest.raises(ValueError, match=f"candidates: {4 * FRAMES} there, {4 * FRAMES + 1} now"):
        check_out_dir(_cfg(path, sel, model_dir, scoring="loglik", frame_select="uniform", candidates=4 * FRAMES + 1))


def test_sweep_rows_come_from_each_runs_summary_and_mixed_runs_are_flagged(tmp_path, data, model_dir, capsys):
    """a run extended after its sweep (a larger --limit) shows its new numbers in the next sweep's
    table; runs on different numbers of samples are flagged under the table"""
    out = tmp_path / "sweep"
    assert _sweep(model_dir, data, out, "--methods", "random", "--budgets", "0.5") == 0
    run_eval(_cfg(data, out / "random_b0.5", model_dir, scoring="loglik", limit=3, policy="projector.out=random"))
    capsys.readouterr()
    assert _sweep(model_dir, data, out, "--methods", "uniform", "--budgets", "0.5") == 0
    rows = {r["label"]: r for r in json.loads((out / "sweep.json").read_text())}
    assert rows["random_b0.5"]["n"] == 3 and rows["uniform_b0.5"]["n"] == 2
    table = (out / "sweep.md").read_text()
    assert "| random | 0.5 | 3 |" in table
    assert "not on the same samples" in table and "n: 3 (random_b0.5); 2 (uniform_b0.5)" in table
    assert "differ in data, frames or samples" in capsys.readouterr().err


def test_dycoke_budget_rule_counts_the_whole_frames_of_any_frame_count():
    from tokenreduce.eval.sweep import SWEEP_METHODS
    spec = SWEEP_METHODS["dycoke_ttm"].spec
    assert spec(0.5, 8) == "projector.out=dycoke_ttm(ratio=0.6667)"   # 2 of 8 frames whole: (1-b) * 4/3
    assert spec(0.5, 6) == "projector.out=dycoke_ttm(ratio=0.75)"     # 2 of 6 whole: (1-b) * 6/4
    assert spec(0.3, 6) == "projector.out=dycoke_ttm(ratio=1.0)"      # below 2/6: not reachable, all pruned
    assert spec(0.5, 1) == "projector.out=dycoke_ttm(ratio=0.0)"      # one frame: nothing to prune


def test_plots_name_the_failed_runs_they_cannot_draw(tmp_path, monkeypatch):
    """a failed method vanished from the plots silently (the table marks it)"""
    import matplotlib.figure

    from tokenreduce.eval.sweep import plot
    texts = []
    real = matplotlib.figure.Figure.text
    monkeypatch.setattr(matplotlib.figure.Figure, "text",
                        lambda fig, x, y, s, *a, **kw: texts.append(s) or real(fig, x, y, s, *a, **kw))
    ok = {"label": "random_b0.5", "method": "random", "budget": 0.5, "policy": "projector.out=random",
          "visual_tokens_final": 65.0, "acc_loglik": 0.5, "acc_generated": 0.5, "ttft_ms": 10.0, "prefill_ms": 9.0}
    failed = {"label": "fastv_b0.5", "method": "fastv", "budget": 0.5, "policy": "llm.layer.2=fastv",
              "failed": "ValueError: x"}
    paths = plot([ok, failed], tmp_path)
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    assert texts == ["failed, not drawn: fastv_b0.5"] * 2
    texts.clear()
    plot([ok], tmp_path)
    assert texts == []


@pytest.mark.parametrize("version", ["2.5", "3"])
def test_hf_qwen_vl_checkpoint_with_its_processor(tmp_path, data, version):
    """--model hf:DIR on a Qwen2.5-VL / Qwen3-VL folder with its real processor (Qwen3-VL's video
    processor writes one vision block per temporal patch, with its timestamp, and its
    get_video_features calls get_image_features: reduced once, not twice). Reduced before and
    inside the LLM, batches score as single samples"""
    import transformers as tf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from tokenreduce.eval.embedded import vocabulary
    special = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    words = ["<pad>", "<unk>", "<", ">", "seconds", "."] + list("0123456789")
    words += [w for w in vocabulary() if w not in words + ["<image>", "<video>"]]
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece(prefix="##")
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    roles = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_bos_token": "<|vision_start|>",
             "vision_eos_token": "<|vision_end|>"}
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", padding_side="right",
                                     extra_special_tokens=roles)
    template = ("{% for m in messages %}{{ m['role'] }} {% for c in m['content'] %}{% if c['type'] == 'video' %}"
                "<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                "{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}")
    pixels = dict(min_pixels=56 * 56, max_pixels=56 * 56)  # 64x64 frames -> 56x56
    image_processor = tf.Qwen2VLImageProcessor(**pixels)
    ids = {t: tok.convert_tokens_to_ids(t) for t in special}
    token_ids = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                     vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    rope = {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512)
    vision = dict(hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=32)
    torch.manual_seed(0)
    if version == "2.5":
        proc = tf.Qwen2_5_VLProcessor(image_processor=image_processor,
                                      video_processor=tf.Qwen2VLVideoProcessor(**pixels), tokenizer=tok,
                                      chat_template=template)
        cfg = tf.Qwen2_5_VLConfig(text_config=tf.Qwen2_5_VLTextConfig(**small, rope_parameters=rope).to_dict(),
                                  vision_config=tf.Qwen2_5_VLVisionConfig(
                                      depth=2, window_size=56, fullatt_block_indexes=[1], **vision).to_dict(),
                                  **token_ids)
        model = tf.Qwen2_5_VLForConditionalGeneration(cfg)
    else:
        proc = tf.Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=template,
                                   video_processor=tf.Qwen3VLVideoProcessor(
                                       patch_size=14, size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56}))
        cfg = tf.Qwen3VLConfig(text_config=tf.Qwen3VLTextConfig(**small, head_dim=8, rope_parameters=dict(
                                   rope, mrope_interleaved=True)).to_dict(),
                               vision_config=tf.Qwen3VLVisionConfig(
                                   depth=3, num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2],
                                   **vision).to_dict(),
                               **token_ids)
        model = tf.Qwen3VLForConditionalGeneration(cfg)
    ckpt = tmp_path / "hf"
    proc.save_pretrained(str(ckpt))
    model.save_pretrained(str(ckpt))
    for policy in ("projector.out=uniform(keep=0.5)", "llm.layer.1=fastv(ratio=0.5)"):
        runs = {}
        for batch in (1, 2):
            out = tmp_path / f"{policy.split('=')[0]}_{batch}"
            summary = run_eval(EvalConfig(data=str(data), out=str(out), model=f"hf:{ckpt}", frames=FRAMES, limit=3,
                                          progress=False, warmup=0, policy=policy, max_new_tokens=2, batch=batch))
            assert summary["errors"] == 0 and summary["n"] == 3
            runs[batch] = read_results(out / "results.jsonl")
        for one, two in zip(runs[1], runs[2]):
            tokens = one["visual_tokens"]
            assert tokens["input"] >= 2 and tokens["final"] == tokens["input"] // 2, tokens
            assert one["id"] == two["id"] and one["generated"] == two["generated"]
            assert one["loglik_scores"] == pytest.approx(two["loglik_scores"], abs=1e-4)
