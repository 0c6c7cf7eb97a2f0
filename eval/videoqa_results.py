"""The per-sample results files of a video-QA run: append-only JSONL written line by line and
fsync'ed, read back skipping a partial last line, repaired after a kill, sharded per process
and merged (see videoqa.py, "Output directory").

Each row carries `record_hash`, a short hash of the input record it answers (record_hash()):
a record edited since its row was written is redone, and the redone row, appended later, is
the one that counts (the last row per id wins when rows are read back or merged). Rows
written before the hash existed have none and count as done."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def read_results(path) -> list:
    """The complete JSON lines of a results file; a partial or unparseable line is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, "rb") as f:
        data = f.read()
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def repair_truncated(path) -> bool:
    """Cut a partial last line (a write interrupted by a kill) so appends start on a clean line.
    Returns True when something was cut."""
    path = Path(path)
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    try:  # a complete record that only lacks its newline is kept
        json.loads(tail)
        with open(path, "ab") as f:
            f.write(b"\n")
        return False
    except json.JSONDecodeError:
        with open(path, "r+b") as f:
            f.truncate(cut)
        return True


def append_result(f, row: dict) -> None:
    f.write(json.dumps(row) + "\n")
    f.flush()
    os.fsync(f.fileno())


def shard(items: list, rank: int, world: int) -> list:
    """Process `rank` of `world` takes items rank::world (every process splits the same list, the
    samples not yet done, read before any process writes)."""
    return items[rank::world]


def results_file(out, rank: int, world: int) -> Path:
    return Path(out) / ("results.jsonl" if world == 1 else f"results.rank{rank}.jsonl")


# what identifies an input record's content (the video file itself is not read)
RECORD_KEYS = ("id", "video", "question", "options", "answer", "meta")


def record_hash(rec: dict) -> str:
    """A short hash of an input record's id, video path, question, options, answer and meta."""
    blob = json.dumps({k: rec.get(k) for k in RECORD_KEYS}, sort_keys=True, ensure_ascii=False, default=str)
    # surrogatepass: a lone surrogate (an escaped half of a UTF-16 pair, valid JSON) must not
    # stop the run while the to-do list is built; valid text hashes as before
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _shard_files(out) -> list:
    """results.rank*.jsonl in rank order (rank10 after rank2)"""
    def rank(p):
        digits = p.name[len("results.rank"):-len(".jsonl")]
        return (int(digits), p.name) if digits.isdigit() else (float("inf"), p.name)
    return sorted(Path(out).glob("results.rank*.jsonl"), key=rank)


def _result_files(out) -> list:
    return [Path(out) / "results.jsonl"] + _shard_files(out)


def done_ids(out) -> set:
    return {r.get("id") for p in _result_files(out) for r in read_results(p)}


def done_hashes(out) -> dict:
    """id -> record_hash of the latest row for that id (None for a row written without one)."""
    return {r.get("id"): r.get("record_hash") for p in _result_files(out) for r in read_results(p)}


def error_ids(out) -> set:
    """ids whose latest row is an error"""
    latest = {r.get("id"): bool(r.get("error")) for p in _result_files(out) for r in read_results(p)}
    return {i for i, failed in latest.items() if failed}


def is_done(done: dict, sample_id, rec_hash: str) -> bool:
    """Whether a sample has a row for this very record: a row without a hash (an older version
    wrote it) counts as done; one with another record's hash (the record was edited) does not."""
    if sample_id not in done:
        return False
    return done[sample_id] is None or done[sample_id] == rec_hash


def merge_results(out, order: list | None = None) -> list:
    """Fold results.rank*.jsonl into results.jsonl (the last row per id wins: a record redone
    after an edit is appended after its stale row, and shards after results.jsonl; sorted by
    `order` when given), written atomically; then the shard files are removed. Returns the rows."""
    out = Path(out)
    shards = _shard_files(out)
    latest = {}  # insertion order: an id's first appearance; value: its last row
    for p in [out / "results.jsonl"] + shards:
        for r in read_results(p):
            latest[r.get("id")] = r
    rows = list(latest.values())
    if shards:
        if order is not None:
            rank = {i: n for n, i in enumerate(order)}
            rows.sort(key=lambda r: rank.get(r.get("id"), len(rank)))
        tmp = out / "results.jsonl.tmp"
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / "results.jsonl")
        for p in shards:
            p.unlink()
    return rows
