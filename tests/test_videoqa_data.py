"""The video-QA JSONL format, the four benchmark converters and the lmms-eval plugin's request
handling. Every fixture is written here in its source format; nothing is downloaded."""
import csv
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from tokenreduce.eval import videoqa_data as vd


def _touch(path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(b"x")
    return str(path)


def _write_jsonl(path, lines):
    Path(path).write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


GOOD = {"id": "a", "video": "v/a.mp4", "question": "what colour ?", "options": ["red", "blue", "green"],
        "answer": 1, "meta": {"qtype": "count"}}


# -- format -------------------------------------------------------------------------------------
def test_load_records_reports_malformed_lines_and_keeps_good_ones(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [
        GOOD,
        "{not json",
        {k: v for k, v in GOOD.items() if k != "video"} | {"id": "b"},
        GOOD | {"id": "c", "options": ["only"]},
        GOOD | {"id": "d", "answer": 3},
        GOOD,                                           # duplicate id "a"
        GOOD | {"id": "e", "extra": 1},
        GOOD | {"id": "f", "options": ["red", ""]},
        GOOD | {"id": "g", "answer": True},
        "",                                             # blank lines are ignored
        GOOD | {"id": "h", "meta": {"start": 5, "end": 2}},
        GOOD | {"id": "i", "answer": "Z"},
        GOOD | {"id": "ok2"},
    ])
    records, problems = vd.load_records(p)
    assert [r["id"] for r in records] == ["a", "ok2"]
    by_line = {q["line"]: q for q in problems}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9, 11, 12]
    assert by_line[2]["id"] is None and "not valid JSON" in by_line[2]["error"]
    assert by_line[3]["id"] == "b" and "missing field(s) video" in by_line[3]["error"]
    assert "id, video, question, options, answer" in by_line[3]["error"]
    assert "2 to 10 entries, got 1" in by_line[4]["error"]
    assert "out of range for 3 options" in by_line[5]["error"] and "0..2" in by_line[5]["error"]
    assert "duplicate id 'a' (first used on line 1)" in by_line[6]["error"]
    assert "unknown top-level field(s) extra" in by_line[7]["error"] and "meta" in by_line[7]["error"]
    assert "option(s) [1]" in by_line[8]["error"]
    assert "boolean" in by_line[9]["error"]
    assert "meta.end (2) must be greater than meta.start (5)" in by_line[11]["error"]
    assert "neither a letter A..C nor the text" in by_line[12]["error"]


def test_load_records_bom_and_a_bad_byte_are_per_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n"
                  + json.dumps(GOOD | {"id": "caf\u00e9-latin1"}, ensure_ascii=False).encode("latin-1") + b"\r\n"
                  + json.dumps(GOOD | {"id": "caf\u00e9"}, ensure_ascii=False).encode() + b"\r\n")
    records, problems = vd.load_records(p)
    assert [r["id"] for r in records] == ["a", "caf\u00e9"]
    assert len(problems) == 1 and problems[0]["line"] == 2 and problems[0]["id"] is None
    assert "not UTF-8 text (byte 0xe9 at column" in problems[0]["error"]
    with pytest.raises(FileNotFoundError, match="is a folder"):
        vd.load_records(tmp_path)


def test_letter_and_text_answers_normalise_to_the_index(tmp_path):
    opts = ["red", "blue", "green", "A"]
    assert vd.answer_index("C", opts) == 2
    assert vd.answer_index("(B)", opts) == 1 and vd.answer_index("B.", opts) == 1
    assert vd.answer_index("green", opts) == 2 and vd.answer_index(" blue ", opts) == 1
    assert vd.answer_index("A", ["A", "B"]) == 0          # letter and text agree
    with pytest.raises(ValueError, match="ambiguous"):
        vd.answer_index("A", opts)                        # letter A = 0, text "A" = option 3
    with pytest.raises(ValueError, match="several options"):
        vd.answer_index("red", ["red", "red", "x"])
    with pytest.raises(ValueError, match="integer 0..1"):
        vd.answer_index(1.0, ["x", "y"])
    p = _write_jsonl(tmp_path / "d.jsonl", [GOOD | {"answer": "C"}, GOOD | {"id": "t", "answer": "blue"}])
    records, problems = vd.load_records(p)
    assert problems == [] and [r["answer"] for r in records] == [2, 1]
    assert vd.validate_record(GOOD | {"answer": "C"}) is None
    assert "missing field(s) answer" in vd.validate_record({k: v for k, v in GOOD.items() if k != "answer"})


def test_relative_videos_resolve_against_the_jsonl_folder_or_video_root(tmp_path):
    sub = tmp_path / "data"
    sub.mkdir()
    absolute = str(tmp_path / "elsewhere" / "x.mp4")
    p = _write_jsonl(sub / "d.jsonl", [GOOD, GOOD | {"id": "b", "video": absolute, "meta": {}},
                                       GOOD | {"id": "c", "video": "../up.mp4"}])
    records, _ = vd.load_records(p)
    assert records[0]["video"] == str(sub / "v" / "a.mp4")
    assert records[0]["meta"] == {"qtype": "count", "video_given": "v/a.mp4"}
    assert records[1]["video"] == absolute and "video_given" not in records[1]["meta"]
    assert records[2]["video"] == str(tmp_path / "up.mp4")
    root = tmp_path / "root"
    records, _ = vd.load_records(p, video_root=root)
    assert records[0]["video"] == str(root / "v" / "a.mp4") and records[1]["video"] == absolute
    with pytest.raises(FileNotFoundError, match="no dataset file"):
        vd.load_records(tmp_path / "missing.jsonl")


def test_write_then_load_round_trips(tmp_path):
    recs = [GOOD | {"video": str(tmp_path / "v" / "a.mp4"), "answer": "green"},
            {"id": "b", "video": str(tmp_path / "b.webm"), "question": "q ?", "options": ["x", "y"], "answer": 0,
             "meta": {"task": "t", "start": 1.5, "end": 4}}]
    out = vd.write_records(tmp_path / "out" / "d.jsonl", recs)
    back, problems = vd.load_records(out)
    assert problems == []
    assert back[0] == GOOD | {"video": str(tmp_path / "v" / "a.mp4"), "answer": 2}
    assert back[1] == recs[1]
    # relative_to_file writes paths the loader resolves back to the same files
    out2 = vd.write_records(tmp_path / "out2" / "d.jsonl", recs, relative_to_file=True)
    assert json.loads(out2.read_text().splitlines()[1])["video"] == "../b.webm"
    back2, _ = vd.load_records(out2)
    assert [r["video"] for r in back2] == [r["video"] for r in back]
    with pytest.raises(ValueError, match=r"record 1 \(id 'a'\) is invalid: duplicate id"):
        vd.write_records(tmp_path / "bad.jsonl", [GOOD, GOOD])
    assert not (tmp_path / "bad.jsonl").exists()


def test_write_records_never_leaves_a_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "d.jsonl"
    out.write_text("keep me\n")
    with pytest.raises(ValueError, match=r"record 1 \(id 'b'\) cannot be written as JSON"):
        vd.write_records(out, [GOOD, GOOD | {"id": "b", "meta": {"s": {1, 2}}}])

    def fail(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(vd.os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        vd.write_records(out, [GOOD])
    assert out.read_text() == "keep me\n" and sorted(os.listdir(tmp_path)) == ["d.jsonl"]


def test_synthetic_dataset_is_in_this_format(tmp_path):
    from tokenreduce.eval.synthetic import write_dataset
    path = write_dataset(tmp_path / "syn", num=2)
    records, problems = vd.load_records(path)
    assert problems == [] and len(records) == 2
    assert all(os.path.isfile(r["video"]) for r in records)


# -- converters ---------------------------------------------------------------------------------
def _nextqa_csv(path, rows):
    cols = ["video", "frame_count", "width", "height", "question", "a0", "a1", "a2", "a3", "a4", "answer", "qid", "type"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
    return path


def test_convert_nextqa(tmp_path):
    vids = tmp_path / "NExTVideo"
    webm = _touch(vids / "1002.webm")
    src = _nextqa_csv(tmp_path / "val.csv", [
        ["1001", 300, 640, 480, "why did the boy run", "to play", "to eat", "to hide", "to sleep", "to swim", 2, 6, "CW"],
        ["1002", 120, 640, 480, "what is on the table", "cup", "book", "pen", "phone", "bowl", 0, 3, "DO"],
        ["1003", 120, 640, 480, "bad", "a", "b", "c", "d", "e", "x", 1, "TN"],
    ])
    skipped = []
    recs = vd.convert_nextqa(src, str(vids), skipped=skipped)
    assert [r["id"] for r in recs] == ["nextqa-1001-6", "nextqa-1002-3"]
    assert recs[0]["options"] == ["to play", "to eat", "to hide", "to sleep", "to swim"] and recs[0]["answer"] == 2
    assert recs[0]["video"] == str(vids / "1001.mp4")          # none on disk: .mp4 kept
    assert recs[1]["video"] == webm                             # the extension that exists
    assert recs[0]["meta"] == {"type": "CW", "qid": "6", "video_id": "1001"}
    assert skipped == [{"id": "nextqa-1003-1", "reason": "answer 'x' is not an integer 0..4"}]
    # map_vid_vidorID.json: CSV video id -> path stem in the original folder layout
    recs = vd.convert_nextqa(src, str(vids), video_map={"1001": "1025/2412446715"})
    assert recs[0]["video"] == str(vids / "1025" / "2412446715.mp4")
    bad = tmp_path / "bad.csv"
    bad.write_text("video,question\n1,q\n")
    with pytest.raises(ValueError, match="missing column"):
        vd.convert_nextqa(bad, str(vids))


def test_convert_nextqa_bad_rows_and_files(tmp_path):
    src = tmp_path / "val.csv"
    _nextqa_csv(src, [["1001", 300, 640, 480, "q", "a", "b", "c", "d", "e", 2, 6, "CW"],
                      ["101", 10, 1, 1, "what", "a", "b", "c"],                         # short row
                      ["102", 10, 1, 1, "what, then", "a", "b", "c", "d", "e", 1, 2, "CW", "extra"],
                      ["1001", 300, 640, 480, "q again", "a", "b", "c", "d", "e", 1, 6, "CW"]])  # same id
    src.write_bytes(b"\xef\xbb\xbf" + src.read_bytes())   # as Excel saves it: the header still parses
    skipped = []
    recs = vd.convert_nextqa(src, str(tmp_path), skipped=skipped)
    assert [r["id"] for r in recs] == ["nextqa-1001-6"] and recs[0]["question"] == "q"
    assert skipped == [{"id": "CSV line 3", "reason": "row has 8 of the header's 13 columns"},
                       {"id": "nextqa-102-2", "reason": "row has 14 of the header's 13 columns"},
                       {"id": "nextqa-1001-6", "reason": "duplicate id 'nextqa-1001-6' (an earlier entry of the "
                                                         "source has the same id; the first is kept)"}]
    latin = tmp_path / "latin.csv"
    _nextqa_csv(latin, [["1001", 300, 640, 480, "caf\u00e9", "a", "b", "c", "d", "e", 2, 6, "CW"]])
    latin.write_bytes(latin.read_text().encode("latin-1"))
    at = latin.read_bytes().index(b"\xe9")
    with pytest.raises(ValueError, match=rf"NExT-QA CSV '.*latin.csv' is not UTF-8 text at byte {at} \(line 2"):
        vd.convert_nextqa(latin, str(tmp_path))
    with pytest.raises(ValueError, match="is a folder, not a file"):
        vd.convert_nextqa(tmp_path, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no NExT-QA CSV at '.*nope.csv' \(no such file\)"):
        vd.convert_nextqa(tmp_path / "nope.csv", str(tmp_path))


def test_convert_mvbench(tmp_path):
    jdir = tmp_path / "json"
    jdir.mkdir()
    (jdir / "action_sequence.json").write_text(json.dumps([
        {"video": "ZS9XR.mp4", "question": "What happened after the person took the food?",
         "candidates": ["Ate the medicine.", "Took the cup."], "answer": "Took the cup.", "start": 11.1, "end": 19.6},
        {"video": "X.mp4", "question": "q", "candidates": ["a", "b"], "answer": "c"},
    ]))
    (jdir / "moving_count.json").write_text(json.dumps([
        {"video": "video_10001.mp4", "question": "How many metal objects?", "candidates": ["2", "3", "1"],
         "answer": "1"},
    ]))
    (jdir / "state_change.json").write_text(json.dumps([
        {"video": "n.mp4", "question": "q", "candidates": [None, "y"], "answer": "y"},
        {"video": "n.mp4", "question": "q", "candidates": "x or y", "answer": "y"},
    ]))
    skipped = []
    recs = vd.convert_mvbench(jdir, str(tmp_path / "video"), skipped=skipped)
    assert [r["id"] for r in recs] == ["mvbench-action_sequence-0", "mvbench-moving_count-0"]
    assert skipped[1:] == [{"id": "mvbench-state_change-0", "reason": "candidate(s) [0] are not texts: [None]"},
                           {"id": "mvbench-state_change-1",
                            "reason": "candidates must be a list of option texts, got str"}]
    skipped = skipped[:1]
    assert recs[0]["answer"] == 1 and recs[0]["options"] == ["Ate the medicine.", "Took the cup."]
    assert recs[0]["meta"] == {"task": "action_sequence", "start": 11.1, "end": 19.6}
    assert recs[0]["video"] == str(tmp_path / "video" / "action_sequence" / "ZS9XR.mp4")
    assert recs[1]["answer"] == 2 and recs[1]["meta"] == {"task": "moving_count"}   # "1" is text, not an index
    assert len(skipped) == 1 and skipped[0]["id"] == "mvbench-action_sequence-1"
    assert "equals 0 of the candidates" in skipped[0]["reason"]
    # one file, and the standard MVBench folder layout
    recs = vd.convert_mvbench(jdir / "moving_count.json", str(tmp_path / "video"), video_dirs="mvbench")
    assert recs[0]["video"] == str(tmp_path / "video" / "clevrer" / "video_validation" / "video_10001.mp4")
    recs = vd.convert_mvbench(jdir / "moving_count.json", "/v", video_dirs={"moving_count": "mc"})
    assert recs[0]["video"] == "/v/mc/video_10001.mp4"


def test_mvbench_layouts_main_branch_and_video_revision(tmp_path):
    """'mvbench' (the main branch's json/: original videos cut by start/end, TVQA as 3 fps frame
    folders, newer clips under data0613/) and 'mvbench-video' (lmms-eval's pre-cut clips: the
    bounds are the source's, not applied again)"""
    jdir = tmp_path / "json"
    jdir.mkdir()
    (jdir / "episodic_reasoning.json").write_text(json.dumps([
        {"video": "castle_s07e04_seg02_clip_14", "question": "q", "candidates": ["a", "b"], "answer": "b",
         "start": 2.0, "end": 9.0}]))
    (jdir / "action_sequence.json").write_text(json.dumps([
        {"video": "ZS9XR.mp4", "question": "q", "candidates": ["a", "b"], "answer": "a", "start": 11.1, "end": 19.6},
        {"video": "EDXBD.mp4", "question": "q", "candidates": ["a", "b"], "answer": "a"}]))
    (jdir / "fine_grained_pose.json").write_text(json.dumps([
        {"video": "S001C001P001R001A001_rgb.avi", "question": "q", "candidates": ["a", "b"], "answer": "a"}]))
    root = tmp_path / "video"
    (root / "data0613" / "star" / "Charades_v1_480").mkdir(parents=True)
    (root / "data0613" / "star" / "Charades_v1_480" / "EDXBD.mp4").write_bytes(b"x")
    main = {r["id"]: r for r in vd.convert_mvbench(jdir, str(root), video_dirs="mvbench")}
    er = main["mvbench-episodic_reasoning-0"]
    assert er["video"] == str(root / "tvqa" / "frames_fps3_hq" / "castle_s07e04_seg02_clip_14")
    assert er["meta"] == {"task": "episodic_reasoning", "start": 2.0, "end": 9.0, "fps": 3.0}
    assert main["mvbench-action_sequence-0"]["video"] == str(root / "star" / "Charades_v1_480" / "ZS9XR.mp4")
    assert main["mvbench-action_sequence-1"]["video"] == str(root / "data0613" / "star" / "Charades_v1_480" / "EDXBD.mp4")
    assert main["mvbench-fine_grained_pose-0"]["video"] == str(root / "nturgbd" / "S001C001P001R001A001_rgb.avi")
    cut = {r["id"]: r for r in vd.convert_mvbench(jdir, str(root), video_dirs="mvbench-video")}
    assert cut["mvbench-action_sequence-0"]["video"] == str(root / "star" / "Charades_segment" / "ZS9XR.mp4")
    assert cut["mvbench-action_sequence-0"]["meta"] == {"task": "action_sequence", "source_start": 11.1,
                                                         "source_end": 19.6}
    assert cut["mvbench-episodic_reasoning-0"]["video"].startswith(str(root / "tvqa" / "video_fps3_hq_segment"))
    assert "fps" not in cut["mvbench-episodic_reasoning-0"]["meta"]
    assert set(vd.MVBENCH_LAYOUTS["mvbench"]) == set(vd.MVBENCH_LAYOUTS["mvbench-video"])
    assert len(vd.MVBENCH_LAYOUTS["mvbench"]) == 20


def test_convert_counts_frame_folders_with_images_as_found_videos(tmp_path, capsys):
    jdir = tmp_path / "json"
    jdir.mkdir()
    (jdir / "episodic_reasoning.json").write_text(json.dumps([
        {"video": c, "question": "q", "candidates": ["a", "b"], "answer": "a"} for c in ("full", "empty")]))
    frames = tmp_path / "video" / "tvqa" / "frames_fps3_hq"
    (frames / "full").mkdir(parents=True)
    (frames / "empty").mkdir()
    (frames / "full" / "00001.jpg").write_bytes(b"x")
    assert vd.convert_main(["mvbench", str(jdir), "--videos", str(tmp_path / "video"), "--video-map", "mvbench",
                            "--out", str(tmp_path / "o.jsonl")]) == 0
    assert "videos found: 1/2" in capsys.readouterr().out


def test_null_texts_are_skipped_not_written_as_none(tmp_path):
    jdir = tmp_path / "json"
    jdir.mkdir()
    (jdir / "state_change.json").write_text(json.dumps([
        {"video": "a.mp4", "question": None, "candidates": ["x", "y"], "answer": "y"},
        {"video": None, "question": "q", "candidates": ["x", "y"], "answer": "y"},
        {"video": "a.mp4", "question": "q", "candidates": ["x", True], "answer": "x"}]))
    skipped = []
    assert vd.convert_mvbench(jdir, "/v", skipped=skipped) == []
    assert [s["reason"] for s in skipped] == ["question must be text, got [None]", "video must be text, got [None]",
                                              "candidate(s) [1] are not texts: [True]"]


def test_relative_paths_stay_inside_a_dataset_folder_reached_through_a_symlink(tmp_path):
    (tmp_path / "real" / "ds" / "videos").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    ds = tmp_path / "link" / "ds"
    rec = {"id": "a", "video": str(ds / "videos" / "a.mp4"), "question": "q", "options": ["x", "y"], "answer": 0}
    vd.write_records(ds / "d.jsonl", [rec], relative_to_file=True)
    assert json.loads((ds / "d.jsonl").read_text())["video"] == os.path.join("videos", "a.mp4")
    # videos outside the linked folder: written relative to the folder load_records reads from
    (tmp_path / "data" / "videos").mkdir(parents=True)
    (tmp_path / "data" / "videos" / "b.mp4").write_bytes(b"x")
    (tmp_path / "deep" / "er").mkdir(parents=True)  # the link one level deeper than its target
    (tmp_path / "deep" / "er" / "x").symlink_to(tmp_path / "real" / "ds")
    rec = dict(rec, video=str(tmp_path / "data" / "videos" / "b.mp4"))
    vd.write_records(tmp_path / "deep" / "er" / "x" / "e.jsonl", [rec], relative_to_file=True)
    recs, problems = vd.load_records(tmp_path / "deep" / "er" / "x" / "e.jsonl")
    assert not problems and os.path.exists(recs[0]["video"])


def test_convert_videomme(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = {"video_id": ["001", "001", "002"], "duration": ["short", "short", "long"],
            "domain": ["Knowledge", "Knowledge", "Sports"], "sub_category": ["Humanity", "Humanity", "Football"],
            "url": ["u", "u", "u"], "videoID": ["fFjv93ACGo8", "fFjv93ACGo8", "ABCD"],
            "question_id": ["001-1", "001-2", "002-1"], "task_type": ["Counting Problem", "OCR", "Action"],
            "question": ["How many?", "What text?", "Who scores?"],
            "options": [["A. 1.", "B. 2.", "C. 3.", "D. 4."], ["A. Hi", "B. Bye", "C. Yo", "D. No"],
                        ["A. x", "B. y", "C. z", "D. w"]],
            "answer": ["C", "A", "E"]}
    pq.write_table(pa.table(rows), tmp_path / "test.parquet")
    mp4_upper = _touch(tmp_path / "data" / "fFjv93ACGo8.MP4")
    skipped = []
    recs = vd.convert_videomme(tmp_path / "test.parquet", str(tmp_path / "data"), skipped=skipped)
    assert [r["id"] for r in recs] == ["videomme-001-1", "videomme-001-2"]
    assert recs[0]["options"] == ["1.", "2.", "3.", "4."] and recs[0]["answer"] == 2
    assert recs[1]["options"] == ["Hi", "Bye", "Yo", "No"] and recs[1]["answer"] == 0
    assert recs[0]["video"] == mp4_upper
    assert recs[0]["meta"] == {"duration": "short", "domain": "Knowledge", "sub_category": "Humanity",
                               "task_type": "Counting Problem", "videoID": "fFjv93ACGo8"}
    assert len(skipped) == 1 and skipped[0]["id"] == "videomme-002-1"
    # the file's own letter, not the index it would stand for
    assert skipped[0]["reason"] == "answer 'E' is not a letter A..D (one per option; the row has 4)"
    # nulls (a pandas / pyarrow rewrite) are skipped, never written as the text "None"
    nulls = dict(rows, options=[["A. 1", None, "C. 3", "D. 4"], ["A. x", "B. y", "C. z", "D. w"],
                                ["A. x", "B. y", "C. z", "D. w"]],
                 question=["q", None, "q"], videoID=["v", "v", None], answer=["A", "A", "A"])
    pq.write_table(pa.table(nulls), tmp_path / "nulls.parquet")
    skipped = []
    assert vd.convert_videomme(tmp_path / "nulls.parquet", str(tmp_path / "data"), skipped=skipped) == []
    assert [s["reason"].split(" must")[0] for s in skipped] == ["options[1]", "question", "videoID"]
    with pytest.raises(FileNotFoundError, match=r"no Video-MME parquet at '.*nonexist.parquet' \(no such file\)"):
        vd.convert_videomme(tmp_path / "nonexist.parquet", str(tmp_path))
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"'.*fake.parquet' cannot be read as parquet"):
        vd.convert_videomme(tmp_path / "fake.parquet", str(tmp_path))


def test_convert_videomme_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"pip install tokenreduce\[eval\]"):
        vd.convert_videomme(tmp_path / "x.parquet", str(tmp_path))


def _egoschema(tmp_path):
    qs = [{"q_uid": f"uid{i}", "google_drive_id": "g", "question": f"what did c do {i}?",
           **{f"option {k}": f"c did {k}" for k in range(5)}} for i in range(4)]
    (tmp_path / "questions.json").write_text(json.dumps(qs))
    (tmp_path / "subset_answers.json").write_text(json.dumps({"uid0": 3, "uid2": 0, "uid3": 7}))
    return tmp_path / "questions.json", tmp_path / "subset_answers.json"


def test_convert_egoschema(tmp_path):
    q, a = _egoschema(tmp_path)
    skipped = []
    recs = vd.convert_egoschema(q, a, "/ego/videos", skipped=skipped)
    assert [r["id"] for r in recs] == ["egoschema-uid0", "egoschema-uid2"]
    assert recs[0] == {"id": "egoschema-uid0", "video": "/ego/videos/uid0.mp4", "question": "what did c do 0?",
                       "options": [f"c did {k}" for k in range(5)], "answer": 3, "meta": {}}
    assert skipped[0] == {"id": "egoschema-uid1", "reason": "no answer in the answers file"}
    assert skipped[1]["id"] == "egoschema-uid3" and "out of range for 5 options" in skipped[1]["reason"]
    # a number q_uid matches the answers file's string key; a list q_uid is skipped, not a crash
    qs = [{"q_uid": 123, "question": "q?", **{f"option {k}": f"o{k}" for k in range(5)}},
          {"q_uid": ["x"], "question": "q?", **{f"option {k}": f"o{k}" for k in range(5)}}]
    (tmp_path / "q2.json").write_text(json.dumps(qs))
    (tmp_path / "a2.json").write_text(json.dumps({"123": 4}))
    skipped = []
    recs = vd.convert_egoschema(tmp_path / "q2.json", tmp_path / "a2.json", "/v", skipped=skipped)
    assert [(r["id"], r["video"], r["answer"]) for r in recs] == [("egoschema-123", "/v/123.mp4", 4)]
    assert skipped == [{"id": None, "reason": "question 1: q_uid must be a string or a number, got list ['x']"}]


def test_convert_cli(tmp_path, capsys):
    q, a = _egoschema(tmp_path)
    vids = tmp_path / "videos"
    _touch(vids / "uid0.mp4")
    out = tmp_path / "ego.jsonl"
    rc = vd.convert_main(["convert", "egoschema", str(q), "--answers", str(a), "--videos", str(vids),
                          "--out", str(out), "--relative"])
    text = capsys.readouterr().out
    assert rc == 0
    assert f"wrote 2 records to {out}" in text and "videos found: 1/2" in text
    assert "skipped 2:" in text and "1  no answer in the answers file  (e.g. egoschema-uid1)" in text
    records, problems = vd.load_records(out)
    assert problems == [] and records[0]["video"] == str(vids / "uid0.mp4")
    assert json.loads(out.read_text().splitlines()[0])["video"] == "videos/uid0.mp4"
    before = out.read_bytes()
    rc = vd.convert_main(["egoschema", str(q), "--answers", str(a), "--videos", str(vids), "--out", str(out),
                          "--limit", "1"])
    assert rc == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    rc = vd.convert_main(["egoschema", str(q), "--answers", str(a), "--videos", str(vids), "--out", str(out),
                          "--limit", "1", "--overwrite"])
    assert rc == 0 and "(of 2; --limit 1)" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 1
    assert vd.convert_main(["egoschema", str(q), "--videos", str(vids), "--out", str(out)]) == 2
    assert "egoschema needs --answers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vd.convert_main(["ucf101", str(q), "--videos", str(vids), "--out", str(out)])
    assert "invalid choice: 'ucf101'" in capsys.readouterr().err


def test_convert_cli_never_overwrites_an_input(tmp_path, capsys):
    src = _nextqa_csv(tmp_path / "keep.csv", [["7", 1, 1, 1, "q", "a", "b", "c", "d", "e", 4, 0, "TN"]])
    before = src.read_bytes()
    for out in (src, tmp_path / "." / "keep.csv"):
        assert vd.convert_main(["nextqa", str(src), "--videos", str(tmp_path), "--out", str(out), "--overwrite"]) == 2
        assert "is the input file" in capsys.readouterr().err and src.read_bytes() == before
    q, a = _egoschema(tmp_path)
    a_before = a.read_bytes()
    assert vd.convert_main(["egoschema", str(q), "--answers", str(a), "--videos", str(tmp_path),
                            "--out", str(a), "--overwrite"]) == 2
    assert "(--answers)" in capsys.readouterr().err and a.read_bytes() == a_before
    jdir = tmp_path / "json"
    jdir.mkdir()
    task = jdir / "t.json"
    task.write_text(json.dumps([{"video": "v.mp4", "question": "q", "candidates": ["x", "y"], "answer": "y"}]))
    assert vd.convert_main(["mvbench", str(jdir), "--videos", str(tmp_path), "--out", str(task), "--overwrite"]) == 2
    assert "is the input file" in capsys.readouterr().err and json.loads(task.read_text())[0]["answer"] == "y"
    # a folder as --out or (for a one-file format) as SRC: one line, no traceback
    assert vd.convert_main(["nextqa", str(src), "--videos", str(tmp_path), "--out", str(jdir)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert vd.convert_main(["nextqa", str(jdir), "--videos", str(tmp_path), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a folder, not a file" in err
    # --answers only means something to egoschema
    assert vd.convert_main(["nextqa", str(src), "--answers", str(a), "--videos", str(tmp_path),
                            "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "--answers applies to egoschema only" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
    # a write that fails (here: the folder of --out is a file) is one line, too
    assert vd.convert_main(["nextqa", str(src), "--videos", str(tmp_path), "--out", str(src / "o.jsonl")]) == 2
    assert "cannot write --out" in capsys.readouterr().err and src.read_bytes() == before


def test_convert_cli_writes_nothing_without_records(tmp_path, capsys):
    q, _ = _egoschema(tmp_path)
    (tmp_path / "none.json").write_text(json.dumps({"other": 1}))
    out = tmp_path / "ego.jsonl"
    args = ["egoschema", str(q), "--answers", str(tmp_path / "none.json"), "--videos", str(tmp_path), "--out", str(out)]
    assert vd.convert_main(args) == 2
    err = capsys.readouterr().err
    assert "no usable records" in err and "was not written" in err
    assert "4  no answer in the answers file  (e.g. egoschema-uid0)" in err
    assert not out.exists()
    out.write_text("old\n")
    assert vd.convert_main(args + ["--overwrite"]) == 2 and out.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["ego.jsonl", "none.json", "questions.json", "subset_answers.json"]


def test_python_dash_m_convert(tmp_path):
    src = _nextqa_csv(tmp_path / "val.csv", [["7", 1, 1, 1, "q", "a", "b", "c", "d", "e", 4, 0, "TN"]])
    out = tmp_path / "n.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "tokenreduce.eval.videoqa_data", "convert", "nextqa", str(src),
                        "--videos", str(tmp_path), "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote 1 record to" in r.stdout
    assert json.loads(out.read_text())["answer"] == 4


# -- lmms-eval plugin, without lmms-eval --------------------------------------------------------
@pytest.fixture(scope="module")
def embedded_random():
    from tokenreduce.eval.lmms_plugin import load_model
    return load_model("embedded-random")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from tokenreduce.eval.synthetic import VideoQAGenerator, write_video
    gen = VideoQAGenerator(frames=4, seed=3)
    sample = gen.sample("count")
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_video(path, gen.render(sample))
    return str(path), sample


def test_plugin_loglikelihood_is_the_models_answer_logprob(embedded_random, clip):
    """score(context, " option") = log p(option word | the embedded prompt and frames), as a
    direct forward computes it; under a policy the reduced forward is used and its stats kept."""
    from tokenreduce.eval.lmms_plugin import ReducedVLM, build_prompt
    from tokenreduce.eval.video import read_frames
    model, proc = embedded_random
    path, s = clip
    context = proc.prompt(s["question"], s["options"]).replace("<video> ", "")
    assert build_prompt(context, proc, "video") == proc.prompt(s["question"], s["options"])
    frames, _ = read_frames(path, num_frames=4)
    with torch.no_grad():
        logp = model(**proc(text=proc.prompt(s["question"], s["options"]), videos=[frames])).logits[0, -1].log_softmax(-1)
    vlm = ReducedVLM(model, proc, None, num_frames=4)
    for opt in s["options"]:
        ll, greedy = vlm.score(context, " " + opt, [path])
        assert ll == pytest.approx(float(logp[proc.tokenizer.convert_tokens_to_ids(opt)]), abs=1e-4)
        assert greedy == (int(logp.argmax()) == proc.tokenizer.convert_tokens_to_ids(opt))
    # two-token continuation: the sum over both tokens
    ll2, _ = vlm.score(context, " red blue", [path])
    assert ll2 < vlm.score(context, " red", [path])[0]

    reduced = ReducedVLM(model, proc, "llm.layer.1=fastv(ratio=0.75)", num_frames=4)
    try:
        ll_r, _ = reduced.score(context, " " + s["options"][0], [path])
        assert math.isfinite(ll_r)
        full = proc(text=proc.prompt(s["question"], s["options"]), videos=[frames])["input_ids"].shape[1] + 1
        visual = 4 * proc.tokens_per_frame + 1
        # FastV keeps a quarter of the visual tokens (rounding aside) and every text token
        assert abs(reduced.stats[-1]["sites"]["llm.layer.1"] - (full - visual + visual // 4)) <= 1
        assert 0 < reduced.stats[-1]["flops_fraction"] < 1
        text = reduced.answer(context, [path], {"max_new_tokens": 2, "until": ["\n"]})
        assert isinstance(text, str)
    finally:
        reduced.close()
    assert not hasattr(model, "_tokenreduce_handle") or model.__dict__.get("_tokenreduce_handle") is None


def test_plugin_prompts_and_visuals():
    from tokenreduce.eval.lmms_plugin import build_prompt, load_visuals
    import numpy as np

    class ChatProc:
        chat_template = "x"
        video_token = "<video>"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            return json.dumps(messages)

    msgs = json.loads(build_prompt("Question?", ChatProc(), "video"))
    assert msgs == [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Question?"}]}]
    assert build_prompt("<video> Question?", ChatProc(), "video") == "<video> Question?"
    with pytest.raises(ValueError, match="valid: video, image, text"):
        build_prompt("q", ChatProc(), "audio")
    assert load_visuals([], 4) == ("text", None)
    kind, data = load_visuals([np.zeros((8, 8, 3), np.uint8)], 4)
    assert kind == "image" and data[0].shape == (8, 8, 3)
    with pytest.raises(ValueError, match="video paths"):
        load_visuals([{"array": 1}], 4)


def test_plugin_class_without_lmms_eval_names_the_install(monkeypatch):
    import tokenreduce.eval.lmms_plugin as plug
    monkeypatch.setitem(sys.modules, "lmms_eval", None)
    monkeypatch.delitem(vars(plug), "TokenReduceLMM", raising=False)
    with pytest.raises(ImportError, match="pip install lmms-eval"):
        plug.TokenReduceLMM
    with pytest.raises(ImportError, match="pip install lmms-eval"):
        plug.lmms_eval_manifest()


def _fake_lmms_eval(monkeypatch):
    """The parts of lmms-eval's API the plugin touches (lmms_eval/api/model.py, api/registry.py,
    models/registry_v2.py), as plain stand-ins."""
    registry = {}

    class lmms:  # noqa: N801 - lmms-eval's name
        is_simple = True

        def __init__(self):
            self.task_dict = {}
            self.cache_hook = types.SimpleNamespace(add_partial=lambda *a: None)

    def register_model(*names):
        def deco(cls):
            for n in names:
                registry[n] = cls
            return cls
        return deco

    mods = {"lmms_eval": types.ModuleType("lmms_eval"), "lmms_eval.api": types.ModuleType("lmms_eval.api"),
            "lmms_eval.api.model": types.ModuleType("lmms_eval.api.model"),
            "lmms_eval.api.registry": types.ModuleType("lmms_eval.api.registry"),
            "lmms_eval.models": types.ModuleType("lmms_eval.models"),
            "lmms_eval.models.registry_v2": types.ModuleType("lmms_eval.models.registry_v2")}
    mods["lmms_eval.api.model"].lmms = lmms
    mods["lmms_eval.api.registry"].register_model = register_model
    mods["lmms_eval.models.registry_v2"].ModelManifest = lambda **kw: kw
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return registry


def test_plugin_lmms_class_handles_requests(monkeypatch, clip):
    import tokenreduce.eval.lmms_plugin as plug
    registry = _fake_lmms_eval(monkeypatch)
    monkeypatch.delitem(vars(plug), "TokenReduceLMM", raising=False)
    try:
        cls = plug.TokenReduceLMM
        assert registry == {"tokenreduce": cls} and cls.is_simple
        assert plug.lmms_eval_manifest() == {"model_id": "tokenreduce",
                                             "simple_class_path": "tokenreduce.eval.lmms_plugin.TokenReduceLMM"}
        with pytest.raises(ValueError, match="unknown model_args.*valid: pretrained, policy"):
            cls(pretrained="embedded-random", conv_template="x")
        lm = cls(pretrained="embedded-random", policy="'llm.layer.1=fastv(ratio=0.5)'", num_frames=4, device="cpu",
                 batch_size=1)
        assert lm.device == torch.device("cpu")  # lmms-eval's evaluator reads it when WORLD_SIZE > 1
        path, s = clip
        lm.task_dict = {"t": {"test": [{"video": path, "q": s["question"]}, {"video": "/no/such.mp4", "q": "x"}]}}
        to_visual = lambda doc: [doc["video"]]
        req = lambda *args: types.SimpleNamespace(args=args)
        ctx = s["question"] + " answer :"
        out = lm.loglikelihood([req(ctx, " " + s["options"][0], to_visual, 0, "t", "test"),
                                req(ctx, lambda doc: " red", to_visual, 1, "t", "test")])
        assert math.isfinite(out[0][0]) and out[0][0] < 0 and out[1] == (-math.inf, False)
        gen = lm.generate_until([req(ctx, {"max_new_tokens": 1, "until": ["\n"]}, to_visual, 0, "t", "test"),
                                 req(ctx, {"max_new_tokens": 1}, to_visual, 1, "t", "test")])
        assert isinstance(gen[0], str) and gen[1] == ""
        assert [f["doc_id"] for f in lm.failures] == [1, 1] and "no such file" in lm.failures[0]["error"]
        assert lm.runner.handle is not None and len(lm.runner.stats) == 2
        # a document with two videos (the embedded model takes one) fails alone, the run goes on
        lm.task_dict["t"]["test"].append({"video": path, "q": "x"})
        two = lm.generate_until([req(ctx, {"max_new_tokens": 1}, lambda doc: [doc["video"]] * 2, 2, "t", "test")])
        assert two == [""] and lm.failures[-1]["doc_id"] == 2
        lm.runner.close()
        with pytest.raises(ValueError, match="batch_size must be 1, got 'auto'"):
            cls(pretrained="embedded-random", batch_size="auto")
        with pytest.raises(ValueError, match=r"frame_select\(scorer='vlm'\) needs the model"):
            cls(pretrained="embedded-random", policy="frames=frame_select(k=2, scorer='vlm')", device="cpu")
    finally:
        vars(plug).pop("TokenReduceLMM", None)


def test_plugin_task_functions_for_jsonl_datasets():
    """doc_to_text / doc_to_target / process_results that let an lmms-eval task YAML read this
    JSONL format; the answer parser takes a letter first, then an option's text."""
    from tokenreduce.eval.lmms_plugin import doc_to_target, doc_to_text, doc_to_visual, parse_choice, process_results
    doc = {"id": "a", "video": "/v/a.mp4", "question": "how many circles are there ?",
           "options": ["zero", "one", "two", "three"], "answer": 2, "meta": {}}
    assert doc_to_visual(doc) == ["/v/a.mp4"] and doc_to_target(doc) == "two"
    assert doc_to_text(doc) == ("how many circles are there ?\nA. zero\nB. one\nC. two\nD. three\n"
                                "Answer with the option's letter from the given choices directly.")
    assert doc_to_text(doc, {"style": "embedded"}) == \
        "user how many circles are there ? options : A zero B one C two D three answer :"
    with pytest.raises(ValueError, match="valid: letters, embedded"):
        doc_to_text(doc, {"style": "chat"})
    assert [parse_choice(p, doc["options"]) for p in ("C", "(C) two", "C. two", "two", "Two.", "it is two",
                                                     "E", "none", "one or two")] == [2, 2, 2, 2, 2, 2, None, None, None]
    assert process_results(doc, ["C"]) == {"accuracy": 1.0} and process_results(doc, ["one"]) == {"accuracy": 0.0}
    mme = ["Apples.", "Candles.", "Berries.", "Same."]  # Video-MME's options end in a full stop
    assert [parse_choice(p, mme) for p in ("Berries.", "berries", "The answer is Berries.", "Apples or Berries.",
                                          "Sameness")] == [2, 2, 2, None, None]


def test_plugin_generation_follows_the_tasks_do_sample():
    """lmms-eval tasks such as mmvet give temperature 0.2 with do_sample false (greedy)"""
    from tokenreduce.eval.lmms_plugin import generate_text

    class Tok:
        pad_token_id, eos_token_id = 0, 0

        def decode(self, ids, skip_special_tokens=True):
            return "B. two"

    class Model:
        def generate(self, **kw):
            self.kw = kw
            return torch.zeros(1, 4, dtype=torch.long)
    inputs = {"input_ids": torch.zeros(1, 2, dtype=torch.long)}
    seen = {}
    for gen_kwargs in ({"temperature": 0.2, "do_sample": False}, {"do_sample": True}, {"temperature": 0.7},
                       {"temperature": 0}):
        m = Model()
        assert generate_text(m, types.SimpleNamespace(tokenizer=Tok()), inputs, gen_kwargs) == "B. two"
        seen[str(gen_kwargs)] = (m.kw["do_sample"], m.kw.get("temperature"))
    assert list(seen.values()) == [(False, None), (True, None), (True, 0.7), (False, None)]


def test_skipped_reasons_without_an_id_print_no_example():
    import io
    out = io.StringIO()
    vd._print_skipped([{"id": None, "reason": "question 3: q_uid must be a string or a number, got list [1]"},
                       {"id": "egoschema-7", "reason": "no answer in the answers file"}], out)
    lines = out.getvalue().splitlines()
    assert lines[1].endswith("got list [1]") and "e.g." not in lines[1]  # was "(e.g. None)"
    assert lines[2].endswith("no answer in the answers file  (e.g. egoschema-7)")
