"""The per-sample results files of a video-QA run: append-only JSONL written line by line and
fsync'ed, read back skipping a partial last line, repaired after a kill, sharded per process
and merged (see videoqa.py, "Output directory")."""
from __future__ import annotations

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
    """Process `rank` of `world` takes items rank::world (fixed by dataset order, so every process
    computes the same split whatever is already done)."""
    return items[rank::world]


def results_file(out, rank: int, world: int) -> Path:
    return Path(out) / ("results.jsonl" if world == 1 else f"results.rank{rank}.jsonl")


def done_ids(out) -> set:
    out = Path(out)
    files = [out / "results.jsonl"] + sorted(out.glob("results.rank*.jsonl"))
    return {r.get("id") for p in files for r in read_results(p)}


def merge_results(out, order: list | None = None) -> list:
    """Fold results.rank*.jsonl into results.jsonl (first line per id wins, sorted by `order`
    when given), written atomically; then the shard files are removed. Returns the rows."""
    out = Path(out)
    shards = sorted(out.glob("results.rank*.jsonl"))
    rows, seen = [], set()
    for p in [out / "results.jsonl"] + shards:
        for r in read_results(p):
            if r.get("id") not in seen:
                seen.add(r.get("id"))
                rows.append(r)
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
