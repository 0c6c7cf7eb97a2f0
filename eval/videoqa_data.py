"""The video-QA evaluation format (multiple-choice JSONL) and converters from four benchmarks.

One sample per line:

    {"id": "nextqa-4010069381-6", "video": "videos/4010069381.mp4", "question": "why did ...",
     "options": ["...", "...", "..."], "answer": 2, "meta": {"type": "CW"}}

  id        non-empty string, unique in the file
  video     path to the clip; a relative path is relative to the JSONL file's folder (or to the
            `video_root` given to `load_records`)
  question  non-empty string
  options   2 to 10 non-empty strings
  answer    the 0-based index into `options`. Also accepted on load, and normalised to the index:
            a letter "A".."J" (upper case, "B." and "(B)" too), or the exact text of one option.
            A string that is both a letter and an option text naming different options is an
            error, so is a text equal to several options.
  meta      optional object; anything else goes here. Known keys: `start` / `end` (clip bounds in
            seconds), and category keys used for per-category accuracy (`qtype`, `task`, `type`,
            `duration`, `domain`, `task_type`, ...). Top-level keys other than the six above are
            rejected: they belong in meta.

This is the normalisation recommended in the project's ecosystem notes (section 6.3) of the
formats lmms-eval reads (section 4.3):

  NExT-QA   (Xiao et al., CVPR 2021) multiple-choice CSV: video, frame_count, width, height,
            question, a0..a4, answer (int), qid, type
  MVBench   (Li et al., CVPR 2024) one JSON list per sub-task: video, question, candidates,
            answer (the text of a candidate), optional start / end
  Video-MME (Fu et al., CVPR 2025) parquet: videoID, question_id, duration, domain,
            sub_category, task_type, question, options ["A. ...", ...], answer (letter)
  EgoSchema (Mangalam et al., NeurIPS 2023) questions.json: q_uid, question, "option 0".."option 4",
            plus an answers JSON {q_uid: int} (the public 500-question subset_answers.json)

    records, problems = load_records("nextqa_val.jsonl")   # problems: malformed lines, not fatal
    python -m tokenreduce.eval.videoqa_data convert nextqa val.csv --videos NExTVideo --out nextqa.jsonl

Videos are not opened here: the runner reports missing or undecodable videos per sample.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import secrets
import sys
from collections import Counter
from pathlib import Path

LETTERS = "ABCDEFGHIJ"
MIN_OPTIONS, MAX_OPTIONS = 2, 10
REQUIRED_FIELDS = ("id", "video", "question", "options", "answer")
FIELDS = REQUIRED_FIELDS + ("meta",)
FORMATS = ("nextqa", "mvbench", "videomme", "egoschema")
VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv")
VIDEOMME_EXTS = (".mp4", ".MP4", ".mkv")
NEXTQA_COLUMNS = ("video", "question", "a0", "a1", "a2", "a3", "a4", "answer", "qid", "type")
VIDEOMME_COLUMNS = ("videoID", "question_id", "question", "options", "answer")

# MVBench keeps each sub-task's clips in the folder of the dataset they were taken from, under the
# OpenGVLab/MVBench `video/` folder. Two layouts exist (select with video_dirs= / --video-map):
#   "mvbench"        the dataset's main branch: the original videos, which the `json/` files
#                    cut with start / end (seconds), and TVQA as folders of frames at 3 fps
#                    (OpenGVLab Ask-Anything video_chat2/mvbench.ipynb, data_list);
#   "mvbench-video"  its `video` revision, which lmms-eval reads (tasks/mvbench/utils.py
#                    DATA_LIST): clips already cut to their segments, TVQA as videos.
# Newer clips of the main branch sit under `video/data0613/<folder>/`; both are searched.
MVBENCH_FRAME_FPS = 3.0  # TVQA's frame folders (frames_fps3_hq)
_MVBENCH_MAIN = {
    "action_sequence": "star/Charades_v1_480", "action_prediction": "star/Charades_v1_480",
    "action_antonym": "ssv2_video", "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test", "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_v1_480", "object_shuffle": "perception/videos",
    "moving_direction": "clevrer/video_validation", "action_localization": "sta/sta_video",
    "scene_transition": "scene_qa/video", "action_count": "perception/videos",
    "moving_count": "clevrer/video_validation", "moving_attribute": "clevrer/video_validation",
    "state_change": "perception/videos", "fine_grained_pose": "nturgbd",
    "character_order": "perception/videos", "egocentric_navigation": "vlnqa",
    "episodic_reasoning": "tvqa/frames_fps3_hq", "counterfactual_inference": "clevrer/video_validation",
}
MVBENCH_LAYOUTS = {
    "mvbench": _MVBENCH_MAIN,
    # the `video` revision differs in the 7 tasks whose clips it ships cut to their segments
    "mvbench-video": {**_MVBENCH_MAIN,
                      "object_interaction": "star/Charades_segment", "action_sequence": "star/Charades_segment",
                      "action_prediction": "star/Charades_segment", "action_localization": "sta/sta_video_segment",
                      "fine_grained_pose": "nturgbd_convert", "episodic_reasoning": "tvqa/video_fps3_hq_segment",
                      "action_antonym": "ssv2_video_mp4"},
}
MVBENCH_FRAME_TASKS = {"mvbench": {"episodic_reasoning"}, "mvbench-video": set()}

_UTF8_BOM = b"\xef\xbb\xbf"
_LETTER_RE = re.compile(r"^\(?([A-J])[.)]?$")
_OPTION_PREFIX_RE = re.compile(r"^\s*\(?([A-J])[.):]\s*")


# -- one record ---------------------------------------------------------------------------------
def answer_index(answer, options) -> int:
    """The 0-based option index `answer` denotes: an int index, a letter ("B", "B.", "(B)") or
    the exact text of one option. Raises ValueError naming what is valid."""
    n = len(options)
    valid = f"an integer 0..{n - 1}, a letter {LETTERS[0]}..{LETTERS[n - 1]} or the text of one option"
    if isinstance(answer, bool):  # bool is an int subclass; True is never meant as index 1
        raise ValueError(f"answer must be {valid}, got the boolean {answer}")
    if isinstance(answer, int):
        if not 0 <= answer < n:
            raise ValueError(f"answer {answer} is out of range for {n} options; valid: {valid}")
        return answer
    if not isinstance(answer, str):
        raise ValueError(f"answer must be {valid}, got {type(answer).__name__} {answer!r}")
    text = answer.strip()
    by_text = [i for i, o in enumerate(options) if o.strip() == text]
    m = _LETTER_RE.match(text)
    by_letter = LETTERS.index(m.group(1)) if m else None
    if by_letter is not None and by_letter >= n:
        if not by_text:
            raise ValueError(f"answer letter {text!r} is out of range for {n} options; valid: {valid}")
        by_letter = None
    if by_letter is not None and by_text and by_text != [by_letter]:
        raise ValueError(f"answer {text!r} is ambiguous: letter {m.group(1)} is option {by_letter} but the text "
                         f"equals option(s) {by_text}; give the answer as an integer index")
    if by_letter is not None:
        return by_letter
    if len(by_text) > 1:
        raise ValueError(f"answer {text!r} equals several options {by_text}; give the answer as an integer index")
    if by_text:
        return by_text[0]
    raise ValueError(f"answer {answer!r} is neither a letter {LETTERS[0]}..{LETTERS[n - 1]} nor the text of "
                     f"one of the options {list(options)}; valid: {valid}")


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def normalise_record(rec) -> tuple:
    """(normalised copy with `answer` an index and `meta` a dict, None) or (None, error message)."""
    if not isinstance(rec, dict):
        return None, f"a record must be a JSON object with fields {', '.join(FIELDS)}, got {type(rec).__name__}"
    missing = [f for f in REQUIRED_FIELDS if f not in rec]
    if missing:
        return None, (f"missing field(s) {', '.join(missing)}; a record needs {', '.join(REQUIRED_FIELDS)} "
                      "(meta optional)")
    extra = [k for k in rec if k not in FIELDS]
    if extra:
        return None, (f"unknown top-level field(s) {', '.join(map(str, extra))}; valid: {', '.join(FIELDS)} "
                      "(put anything else in meta)")
    for f in ("id", "video", "question"):
        if not isinstance(rec[f], str) or not rec[f].strip():
            return None, f"{f} must be a non-empty string, got {type(rec[f]).__name__} {rec[f]!r}"
    opts = rec["options"]
    if not isinstance(opts, list):
        return None, (f"options must be a list of {MIN_OPTIONS} to {MAX_OPTIONS} non-empty strings, "
                      f"got {type(opts).__name__}")
    if not MIN_OPTIONS <= len(opts) <= MAX_OPTIONS:
        return None, f"options must have {MIN_OPTIONS} to {MAX_OPTIONS} entries, got {len(opts)}"
    bad = [i for i, o in enumerate(opts) if not isinstance(o, str) or not o.strip()]
    if bad:
        return None, f"options must be non-empty strings; option(s) {bad} are not: {[opts[i] for i in bad]}"
    same = [(i, j) for i in range(len(opts)) for j in range(i) if opts[i].strip() == opts[j].strip()]
    if same:  # equal options score equally: which twin "wins" would be the order, not the model
        i, j = same[0]
        return None, (f"options {j} and {i} are the same text {opts[i].strip()!r}, so no model can tell them "
                      "apart; options must differ")
    meta_text = json.dumps(rec.get("meta"), ensure_ascii=False, default=str)
    text = [rec["id"], rec["video"], rec["question"], *opts, meta_text]
    if any(_has_surrogate(t) for t in text):
        return None, ("id, video, question, an option or meta holds a lone UTF-16 surrogate (an escape such as "
                      "\\udc80 without its pair): not valid Unicode text")
    meta = rec.get("meta")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        return None, f"meta must be a JSON object (or absent), got {type(meta).__name__}"
    for key in ("start", "end"):
        v = meta.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            return None, f"meta.{key} must be a number of seconds >= 0 (or null), got {v!r}"
    if meta.get("start") is not None and meta.get("end") is not None and meta["end"] <= meta["start"]:
        return None, f"meta.end ({meta['end']}) must be greater than meta.start ({meta['start']})"
    try:
        answer = answer_index(rec["answer"], opts)
    except ValueError as exc:
        return None, str(exc)
    return {**rec, "answer": answer, "meta": dict(meta)}, None


def validate_record(rec) -> str | None:
    """The error message of a malformed record, or None when it is valid (letter and option-text
    answers are valid: `load_records` normalises them)."""
    return normalise_record(rec)[1]


# -- files --------------------------------------------------------------------------------------
def resolve_video(video: str, base) -> str:
    """`video` as an absolute, normalised path; relative paths are taken from `base`."""
    p = os.path.expanduser(video)
    if not os.path.isabs(p):
        p = os.path.join(os.path.abspath(os.fspath(base)), p)
    return os.path.normpath(p)


def load_records(path, video_root=None) -> tuple:
    """Read a JSONL dataset. Returns (records, problems).

    records: valid samples in file order, `answer` an index, `meta` a dict, `video` an absolute
    path (relative ones resolved against `video_root`, or else the JSONL's folder; the path as
    written is kept in meta["video_given"] when it changed). problems: one
    {"line": n (1-based), "id": id or None, "error": message} per malformed line (not UTF-8,
    bad JSON, invalid record, duplicate id); those lines are skipped and loading goes on. Blank
    lines are ignored; a UTF-8 byte-order mark at the start of the file is dropped. A missing
    file (or a folder) raises FileNotFoundError.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is a folder; give the dataset's .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"no dataset file at {str(path)!r}")
    base = Path(video_root) if video_root is not None else path.resolve().parent
    records, problems, first_line = [], [], {}
    data = path.read_bytes()
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM):]
    # bytes.splitlines splits on \n, \r\n and \r, as reading in text mode does; a JSON line holds
    # no raw \r or \n (they must be escaped inside strings)
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append({"line": n, "id": None, "error": f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                                                             f"column {exc.start + 1}); save the file as UTF-8"})
            continue
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append({"line": n, "id": None, "error": f"not valid JSON ({exc.msg} at column {exc.colno})"})
            continue
        rid = rec.get("id") if isinstance(rec, dict) and isinstance(rec.get("id"), str) else None
        norm, err = normalise_record(rec)
        if err is None and norm["id"] in first_line:
            err = f"duplicate id {norm['id']!r} (first used on line {first_line[norm['id']]}); ids must be unique"
        if err is not None:
            problems.append({"line": n, "id": rid, "error": err})
            continue
        first_line[norm["id"]] = n
        video = resolve_video(norm["video"], base)
        if video != norm["video"]:
            norm["meta"].setdefault("video_given", norm["video"])
            norm["video"] = video
        records.append(norm)
    return records, problems


def write_records(path, records, relative_to_file: bool = False) -> Path:
    """Write records as JSONL (answers normalised to indices, keys in the canonical order).

    Raises ValueError naming the first invalid record, duplicate id or value JSON cannot hold
    (in meta), before anything is written. The file is written under a temporary name in the
    same folder and then renamed over `path` (an existing file is replaced), so a failed write
    leaves no partial file. relative_to_file: write each video path relative to the output
    file's folder (so the dataset can move with its videos); otherwise the paths are written as
    given.
    """
    path = Path(path)
    out, seen = [], set()
    for i, rec in enumerate(records):
        norm, err = normalise_record(rec)
        if err is None and norm["id"] in seen:
            err = f"duplicate id {norm['id']!r}"
        if err is not None:
            rid = rec.get("id") if isinstance(rec, dict) else None
            raise ValueError(f"record {i} (id {rid!r}) is invalid: {err}")
        seen.add(norm["id"])
        if relative_to_file:
            # both sides resolved, as load_records reads them back (from the file's real folder):
            # through a symlinked folder the path must not climb out past the link's target
            norm["video"] = os.path.relpath(os.path.realpath(resolve_video(norm["video"], Path.cwd())),
                                            path.resolve().parent)
        try:
            out.append(json.dumps({k: norm[k] for k in FIELDS}, ensure_ascii=False) + "\n")
        except (TypeError, ValueError) as exc:  # e.g. a set or another non-JSON object in meta
            raise ValueError(f"record {i} (id {norm['id']!r}) cannot be written as JSON: {exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    # write a temporary file next to `path`, then rename it over `path`: a failure part-way
    # never leaves a truncated file, and an existing `path` is only replaced by a complete one
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 less the umask, as open() does
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.writelines(out)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# -- converters ---------------------------------------------------------------------------------
def _find_video(folder, stem: str, exts) -> str:
    """folder/stem+ext for the first ext that exists; folder/stem+exts[0] when none does."""
    for ext in exts:
        p = os.path.join(folder, stem + ext)
        if os.path.exists(p):
            return p
    return os.path.join(folder, stem + exts[0])


class _Records(list):
    """A converter's output: a list that also knows its ids (a repeated source entry is skipped)."""

    def __init__(self):
        super().__init__()
        self.ids = set()


def _keep(rec, records: "_Records", skipped) -> None:
    err = validate_record(rec)
    if err is None and rec["id"] in records.ids:
        err = f"duplicate id {rec['id']!r} (an earlier entry of the source has the same id; the first is kept)"
    if err is None:
        records.append(rec)
        records.ids.add(rec["id"])
    elif skipped is not None:
        skipped.append({"id": rec.get("id"), "reason": err})


def _skip(skipped, rid, reason: str) -> None:
    if skipped is not None:
        skipped.append({"id": rid, "reason": reason})


def _source_file(path, what: str) -> Path:
    """`path` as a Path when it is an existing file; else FileNotFoundError (nothing there) or
    ValueError (a folder), each naming `what` and the path."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a folder, not a file")
    if not p.exists():
        raise FileNotFoundError(f"no {what} at {str(p)!r} (no such file)")
    return p


def _read_text(path, what: str) -> str:
    """The file's text, decoded as UTF-8 (a leading byte-order mark dropped). Errors name the
    file, and for bytes that are not UTF-8 the byte offset and line."""
    data = _source_file(path, what).read_bytes()
    skip = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = skip + exc.start  # offset in the file
        line = data.count(b"\n", 0, at) + 1
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text at byte {at} (line {line}: byte "
                         f"0x{data[at]:02x}); save it as UTF-8") from None


def _read_json(path, what: str):
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {exc}") from None


def _load_video_map(video_map) -> dict:
    if video_map is None:
        return {}
    if isinstance(video_map, dict):
        return {str(k): str(v) for k, v in video_map.items()}
    m = _read_json(video_map, "video map")
    if not isinstance(m, dict):
        raise ValueError(f"video map {str(video_map)!r} must be a JSON object {{name: folder or path}}, "
                         f"got {type(m).__name__}")
    return {str(k): str(v) for k, v in m.items()}


def convert_nextqa(csv_path, video_dir, video_map=None, skipped: list | None = None) -> list:
    """NExT-QA multiple-choice CSV (val.csv / test.csv) -> records.

    id `nextqa-{video}-{qid}`; video `{video_dir}/{video}` + the first of .mp4/.webm/.avi/.mkv
    that exists (.mp4 when none does). video_map: the dataset's map_vid_vidorID.json (or a dict)
    mapping the CSV's video id to its path stem under video_dir ("1025/2412446715"), as the
    original NExTVideo folder is laid out. meta: type (CW/CH/TN/TC/DC/DL/DO...), qid, video id.
    Rows that cannot be converted are left out and described in `skipped`.
    """
    vmap = _load_video_map(video_map)
    records = _Records()
    text = _read_text(csv_path, "NExT-QA CSV")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        missing = [c for c in NEXTQA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{str(csv_path)!r} is not a NExT-QA multiple-choice CSV: missing column(s) "
                             f"{', '.join(missing)}; expected {', '.join(NEXTQA_COLUMNS)}")
        ncols = len(reader.fieldnames)
        for row in reader:
            vid, qid = (row.get("video") or "").strip(), (row.get("qid") or "").strip()
            rid = f"nextqa-{vid}-{qid}"
            # DictReader fills the missing fields of a short row with None and keeps the extra
            # fields of a long one under the key None: both rows are misaligned, so left out
            extra = row.pop(None, None) or []
            given = sum(v is not None for v in row.values()) + len(extra)
            if given != ncols:
                _skip(skipped, rid if vid and qid else f"CSV line {reader.line_num}",
                      f"row has {given} of the header's {ncols} columns")
                continue
            try:
                answer = int(row["answer"])
            except (TypeError, ValueError):
                _skip(skipped, rid, f"answer {row['answer']!r} is not an integer 0..4")
                continue
            rec = {"id": rid, "video": _find_video(video_dir, vmap.get(vid, vid), VIDEO_EXTS),
                   "question": row["question"].strip(),
                   "options": [row[f"a{i}"].strip() for i in range(5)], "answer": answer,
                   "meta": {"type": row["type"].strip(), "qid": qid, "video_id": vid}}
            _keep(rec, records, skipped)
    except csv.Error as exc:
        raise ValueError(f"NExT-QA CSV {str(csv_path)!r} cannot be read as CSV (line {reader.line_num}): "
                         f"{exc}") from None
    return records


def convert_mvbench(src, video_root, video_dirs=None, skipped: list | None = None) -> list:
    """MVBench sub-task JSON file(s) -> records.

    src: one `<task>.json` or a folder of them (the task name is the file stem). Each file is a
    list of {video, question, candidates, answer (candidate text), start?, end?}. The clips of a
    task are in `{video_root}/{video_dirs[task]}/` when video_dirs names the task (a dict, a JSON
    file, or a standard layout: "mvbench" for the main branch's `json/` files, "mvbench-video"
    for the pre-cut clips of its `video` revision, see MVBENCH_LAYOUTS), else in
    `{video_root}/{task}/`; a clip missing there is looked for under `{video_root}/data0613/`.
    id `mvbench-{task}-{index in file}`; meta: task, start / end (seconds; under "mvbench-video"
    the clips are already cut, so they are kept as source_start / source_end and not applied),
    and fps for the tasks stored as folders of frames (the `video` path is then that folder).
    """
    layout = video_dirs if isinstance(video_dirs, str) and video_dirs in MVBENCH_LAYOUTS else None
    vdirs = dict(MVBENCH_LAYOUTS[layout]) if layout else _load_video_map(video_dirs)
    frame_tasks = MVBENCH_FRAME_TASKS[layout] if layout else set()
    src = Path(src)
    if src.is_dir():
        files = sorted(src.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"no MVBench *.json files in {str(src)!r}")
    elif src.is_file():
        files = [src]
    else:
        raise FileNotFoundError(f"no MVBench JSON file or folder at {str(src)!r}")
    records = _Records()
    for file in files:
        task = file.stem
        items = _read_json(file, "MVBench task file")
        if not isinstance(items, list):
            raise ValueError(f"MVBench task file {str(file)!r} must hold a JSON list of "
                             f"{{video, question, candidates, answer}}, got {type(items).__name__}")
        sub = vdirs.get(task, task)
        folder = os.path.join(video_root, sub)
        for i, it in enumerate(items):
            rid = f"mvbench-{task}-{i}"
            if not isinstance(it, dict) or any(k not in it for k in ("video", "question", "candidates", "answer")):
                _skip(skipped, rid, "entry needs video, question, candidates and answer")
                continue
            bad = [k for k in ("video", "question") if not _is_text(it[k])]
            if bad:  # str(None) would become the text "None"
                _skip(skipped, rid, f"{' and '.join(bad)} must be text, got {[it[k] for k in bad]}")
                continue
            cands = it["candidates"]
            if not isinstance(cands, list):
                _skip(skipped, rid, f"candidates must be a list of option texts, got {type(cands).__name__}")
                continue
            bad = [k for k, c in enumerate(cands) if not _is_text(c)]
            if bad:
                _skip(skipped, rid, f"candidate(s) {bad} are not texts: {[cands[k] for k in bad]}")
                continue
            if not _is_text(it["answer"]):
                _skip(skipped, rid, f"answer must be the text of one candidate, got {it['answer']!r}")
                continue
            cands = [str(c) for c in cands]
            meta = {"task": task}
            for key in ("start", "end"):
                if it.get(key) is not None:
                    meta[key if layout != "mvbench-video" else f"source_{key}"] = it[key]
            if task in frame_tasks:
                meta["fps"] = MVBENCH_FRAME_FPS
            # the answer is a candidate's text: match it as text only (a candidate may be "A")
            hits = [k for k, c in enumerate(cands) if c.strip() == str(it["answer"]).strip()]
            if len(hits) != 1:
                _skip(skipped, rid, f"answer {it['answer']!r} equals {len(hits)} of the candidates, not exactly one")
                continue
            video = os.path.join(folder, str(it["video"]))
            later = os.path.join(video_root, "data0613", sub, str(it["video"]))
            if not os.path.exists(video) and os.path.exists(later):
                video = later
            rec = {"id": rid, "video": video, "question": str(it["question"]),
                   "options": cands, "answer": hits[0], "meta": meta}
            _keep(rec, records, skipped)
    return records


def _is_text(value) -> bool:
    """a value that is meant as text (a str or a number), not None / NaN / a list or object"""
    if isinstance(value, float):
        return value == value
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def convert_videomme(parquet_path, video_dir, skipped: list | None = None) -> list:
    """Video-MME parquet (lmms-lab/Video-MME test-*.parquet) -> records.

    Options lose their "A. " prefix and the answer letter becomes an index; id
    `videomme-{question_id}`; video `{video_dir}/{videoID}` + the first of .mp4/.MP4/.mkv that
    exists; meta: duration (short/medium/long), domain, sub_category, task_type, videoID.
    Needs pyarrow (`pip install tokenreduce[eval]`).
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("reading the Video-MME parquet needs pyarrow: pip install tokenreduce[eval] "
                          f"(or pip install pyarrow) ({exc})") from exc
    _source_file(parquet_path, "Video-MME parquet")
    try:
        table = pq.read_table(parquet_path)
    except (OSError, ValueError, pa.ArrowException) as exc:  # e.g. ArrowInvalid: not a parquet file
        raise ValueError(f"Video-MME parquet {str(parquet_path)!r} cannot be read as parquet: {exc}") from None
    missing = [c for c in VIDEOMME_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{str(parquet_path)!r} is not a Video-MME parquet: missing column(s) {', '.join(missing)}; "
                         f"expected {', '.join(VIDEOMME_COLUMNS)} (and duration, domain, sub_category, task_type)")
    records = _Records()
    for row in table.to_pylist():
        rid = f"videomme-{row['question_id']}"
        opts = row["options"]
        if not isinstance(opts, list):
            _skip(skipped, rid, f"options must be a list of 'A. ...' strings, got {type(opts).__name__}")
            continue
        bad = [f"options[{k}]" for k, o in enumerate(opts) if not _is_text(o)] + \
            [k for k in ("question", "videoID") if not _is_text(row[k])]
        if bad:  # str(None) would become the text "None"
            _skip(skipped, rid, f"{', '.join(bad)} must be text (got null / NaN / a list)")
            continue
        opts = [_OPTION_PREFIX_RE.sub("", str(o), count=1) for o in opts]
        meta = {k: row[k] for k in ("duration", "domain", "sub_category", "task_type") if row.get(k) is not None}
        meta["videoID"] = row["videoID"]
        answer = str(row["answer"]).strip()
        m = _LETTER_RE.match(answer)
        if not m or LETTERS.index(m.group(1)) >= len(opts):  # the letter is the answer; never its text
            _skip(skipped, rid, f"answer {answer!r} is not a letter A..{LETTERS[len(opts) - 1]} "
                                f"(one per option; the row has {len(opts)})")
            continue
        rec = {"id": rid, "video": _find_video(video_dir, str(row["videoID"]), VIDEOMME_EXTS),
               "question": str(row["question"]), "options": opts,
               "answer": LETTERS.index(_LETTER_RE.match(answer).group(1)), "meta": meta}
        _keep(rec, records, skipped)
    return records


def convert_egoschema(questions_path, answers_path, video_dir, skipped: list | None = None) -> list:
    """EgoSchema questions.json + an answers JSON {q_uid: int} (subset_answers.json) -> records.

    Questions without an answer (the hidden full test set) are left out and counted in
    `skipped`. id `egoschema-{q_uid}`; video `{video_dir}/{q_uid}.mp4`.
    """
    questions = _read_json(questions_path, "EgoSchema questions file")
    answers = _read_json(answers_path, "EgoSchema answers file")
    if not isinstance(questions, list):
        raise ValueError(f"EgoSchema questions file {str(questions_path)!r} must hold a JSON list of "
                         f"{{q_uid, question, option 0..option 4}}, got {type(questions).__name__}")
    if not isinstance(answers, dict):
        raise ValueError(f"EgoSchema answers file {str(answers_path)!r} must hold a JSON object {{q_uid: int}}, "
                         f"got {type(answers).__name__}")
    records = _Records()
    for i, q in enumerate(questions):
        if not isinstance(q, dict):
            _skip(skipped, None, f"question {i} is not a JSON object {{q_uid, question, option 0..option 4}}")
            continue
        uid = q.get("q_uid")
        if uid is None:
            _skip(skipped, None, f"question {i} has no q_uid")
            continue
        if isinstance(uid, bool) or not isinstance(uid, (str, int)):
            _skip(skipped, None, f"question {i}: q_uid must be a string or a number, got {type(uid).__name__} {uid!r}")
            continue
        uid = str(uid)  # the answers file's keys are strings (JSON object keys always are)
        rid = f"egoschema-{uid}"
        if uid not in answers:
            _skip(skipped, rid, "no answer in the answers file")
            continue
        opts = [q.get(f"option {k}") for k in range(5)]
        ans = answers[uid]
        if isinstance(ans, str) and ans.strip().isdigit():  # some copies store "3"
            ans = int(ans)
        rec = {"id": rid, "video": os.path.join(video_dir, f"{uid}.mp4"), "question": q.get("question"),
               "options": opts, "answer": ans, "meta": {}}
        _keep(rec, records, skipped)
    return records


# -- command line -------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenreduce convert",
        description="Convert a video-QA benchmark's annotation file(s) to the tokenreduce JSONL format.")
    p.add_argument("format", choices=FORMATS, help="source format")
    p.add_argument("src", help="nextqa: the MC CSV; mvbench: a task JSON or a folder of them; "
                               "videomme: the parquet; egoschema: questions.json")
    p.add_argument("--videos", required=True, help="folder holding the videos (mvbench: the root of the task folders)")
    p.add_argument("--out", required=True, help="output JSONL (never one of the input files; an existing file "
                                                "only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    p.add_argument("--answers", help="egoschema: answers JSON {q_uid: int} (e.g. subset_answers.json)")
    p.add_argument("--video-map", help="nextqa: map_vid_vidorID.json; mvbench: JSON {task: folder under --videos}, "
                                       "or a standard layout: 'mvbench' (the main branch's json/ files: original "
                                       "videos cut by start/end, TVQA frame folders) or 'mvbench-video' (the "
                                       "pre-cut clips of its `video` revision, as lmms-eval reads them)")
    p.add_argument("--limit", type=int, help="keep only the first N records")
    p.add_argument("--relative", action="store_true", help="write video paths relative to the output file's folder "
                                                          "(default: absolute)")
    return p


def convert(fmt: str, src, videos, answers=None, video_map=None, skipped: list | None = None) -> list:
    """Dispatch to the converter of `fmt` (one of FORMATS). `answers` is for egoschema only and
    `video_map` for nextqa and mvbench only; giving either to another format is a ValueError."""
    if fmt in FORMATS and answers is not None and fmt != "egoschema":
        raise ValueError(f"answers (--answers) apply to egoschema only, not {fmt}")
    if fmt in FORMATS and video_map is not None and fmt not in ("nextqa", "mvbench"):
        raise ValueError(f"a video map (--video-map) applies to nextqa and mvbench only, not {fmt}")
    if fmt == "nextqa":
        return convert_nextqa(src, videos, video_map=video_map, skipped=skipped)
    if fmt == "mvbench":
        return convert_mvbench(src, videos, video_dirs=video_map, skipped=skipped)
    if fmt == "videomme":
        return convert_videomme(src, videos, skipped=skipped)
    if fmt == "egoschema":
        if answers is None:
            raise ValueError("egoschema needs --answers FILE (a JSON {q_uid: int}, e.g. subset_answers.json)")
        return convert_egoschema(src, answers, videos, skipped=skipped)
    raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def _input_files(args) -> list:
    """The files `convert` reads for these arguments (that exist), as (option, path) pairs."""
    src = Path(args.src)
    found = [("SRC", p) for p in sorted(src.glob("*.json"))] if args.format == "mvbench" and src.is_dir() \
        else [("SRC", src)]
    if args.answers is not None:
        found.append(("--answers", Path(args.answers)))
    if args.video_map is not None and not (args.format == "mvbench" and args.video_map in MVBENCH_LAYOUTS):
        found.append(("--video-map", Path(args.video_map)))
    return [(opt, p) for opt, p in found if p.is_file()]


def _readable_video(path) -> bool:
    """a video file, or a folder holding frame images (what read_frames reads)"""
    from .video import frame_files
    return bool(frame_files(path)) if os.path.isdir(path) else os.path.isfile(path)


def _print_skipped(skipped: list, file) -> None:
    print(f"skipped {len(skipped)}:", file=file)
    reasons = Counter(s["reason"] for s in skipped).most_common()
    example = {}
    for s in skipped:
        example.setdefault(s["reason"], s["id"])
    for reason, n in reasons[:10]:
        eg = f"  (e.g. {example[reason]})" if example[reason] is not None else ""  # no id: the reason names it
        print(f"  {n:6d}  {reason}{eg}", file=file)
    if len(reasons) > 10:
        print(f"  ... and {len(reasons) - 10} more distinct reasons", file=file)


def convert_main(argv=None) -> int:
    """`tokenreduce convert FORMAT SRC --videos DIR --out FILE [...]`; argv are the arguments
    after `convert` (a leading "convert" is accepted too). Prints the counts; returns 0, or 2
    on bad input (nothing is written then). --out is never one of the input files, and an
    existing --out is replaced only with --overwrite; the output is written to a temporary file
    and renamed into place, so a failed run leaves no partial file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        argv = argv[1:]
    args = _parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        print(f"--limit must be >= 1, got {args.limit}", file=sys.stderr)
        return 2
    if args.video_map is not None and args.format not in ("nextqa", "mvbench"):
        print(f"--video-map applies to nextqa and mvbench only, not {args.format}", file=sys.stderr)
        return 2
    if args.answers is not None and args.format != "egoschema":
        print(f"--answers applies to egoschema only (its answers JSON), not {args.format}", file=sys.stderr)
        return 2
    if args.answers is None and args.format == "egoschema":
        print("egoschema needs --answers FILE (a JSON {q_uid: int}, e.g. subset_answers.json)", file=sys.stderr)
        return 2
    out = Path(os.path.expanduser(args.out))
    if out.is_dir():
        print(f"--out {args.out!r} is a folder; give the path of the JSONL file to write", file=sys.stderr)
        return 2
    for opt, p in _input_files(args):
        if _same_file(out, p):
            print(f"--out {args.out!r} is the input file {str(p)!r} ({opt}); refusing to overwrite an input: "
                  "choose another --out", file=sys.stderr)
            return 2
    if out.exists() and not args.overwrite:
        print(f"--out {args.out!r} already exists; pass --overwrite to replace it, or choose another --out",
              file=sys.stderr)
        return 2
    videos = os.path.abspath(os.path.expanduser(args.videos))
    if not os.path.isdir(videos):
        print(f"warning: --videos {videos!r} is not a folder; paths are written anyway", file=sys.stderr)
    skipped = []
    try:
        records = convert(args.format, args.src, videos, answers=args.answers, video_map=args.video_map,
                          skipped=skipped)
    except (OSError, ValueError, ImportError) as exc:
        print(f"cannot convert: {exc}", file=sys.stderr)
        return 2
    if not records:
        print(f"cannot convert: no usable records in {args.src!r} ({len(skipped)} entries skipped); "
              f"{args.out!r} was not written", file=sys.stderr)
        if skipped:
            _print_skipped(skipped, sys.stderr)
        return 2
    total = len(records)
    if args.limit is not None:
        records = records[:args.limit]
    try:
        write_records(out, records, relative_to_file=args.relative)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(out) else ""
        print(f"cannot write --out {args.out!r}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    found = sum(_readable_video(r["video"]) for r in records)
    print(f"wrote {len(records)} record{'s' if len(records) != 1 else ''} to {args.out}"
          + (f" (of {total}; --limit {args.limit})" if len(records) < total else ""))
    print(f"videos found: {found}/{len(records)}")
    if skipped:
        _print_skipped(skipped, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(convert_main())
