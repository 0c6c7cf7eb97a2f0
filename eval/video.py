"""Video decoding for every video feature: decord first, PyAV as the fallback.

    frames, meta = read_frames("clip.mp4", num_frames=16)      # (16, H, W, 3) uint8, RGB
    frames, meta = read_frames("clip.mp4", fps=2)               # 2 frames per second of video
    frames, meta = read_frames("clip.mp4", indices=[0, 5, 9])   # exactly these frames

Both backends give the same frame indices (sampling is computed here, from the frame count and
the average frame rate, never by the backend) and, for common streams, the same pixels: both
decode with FFmpeg and convert to packed RGB24 (checked in tests/test_video_decode.py on clips
written with PyAV: lossless RGB H.264 `libx264rgb`, FFV1 and MPEG-4 Part 2 in yuv420p all decode
bit-identically; the lossless RGB ones also equal the frames that were written). Their chroma
upsampling differs at colour edges for odd frame sizes and 10-bit streams (a few levels).
Frames come upright: a rotated video (display matrix, e.g. a phone's portrait clip) is turned
as the matrix says. "auto" decodes MPEG-TS and rotated videos with PyAV (decord shifts TS frames
with reordered B-frames and mishandles rotation), and both backends read the best video stream.
Variable frame rate: where a video's frame times stray more than half a frame from
i / average rate, `fps=f` takes the frame shown at each multiple of 1/f seconds and `timestamps`
are the frames' own presentation times (for constant-rate video both are the index arithmetic
below). Frames never shown are not counted: a stream whose first packet is not a keyframe (a
cut made by stream copy mid-GOP) loses the frames shown before its first keyframe, and an MP4
edit list hides leading frames (packets marked discard). For such a stream (told from its first
GOP's packets, with PyAV) the frames are the shown ones, indexed and timed from the first;
"auto" decodes it with PyAV, and decord reads it in order from the start (its frame count
includes the lost frames, its tail repeated the last frame and its seeks land off by their
number, differently after different reads).

Sampling conventions
  num_frames=k   uniform over the whole video, endpoints included: round(linspace(0, n-1, k))
                 (lmms-eval's `load_video_decord` uses the same linspace, truncated instead of
                 rounded; VLMEvalKit excludes the endpoints). k > n repeats frames, so the
                 result always has k frames.
  fps=f          one frame every 1/f seconds of video time, from t=0: round(i * native_fps / f)
                 for i = 0, 1, ... while < n (each frame at most once, so f above the native
                 rate gives every frame). With num_frames as well, those are thinned
                 uniformly to at most num_frames.
  indices=[...]  exactly these (0 <= i < n), in the given order.
  nothing        every frame.

Frame folders: a folder of images (.jpg / .jpeg / .png / .bmp / .webp, ordered by the numbers in
their names, e.g. MVBench's TVQA clips) reads as a video, frame i being the i-th image, with the
same sampling; its rate is not stored anywhere, so `frame_rate=` gives it (fps sampling and
timestamps need it, uniform and index sampling do not).

Errors: VideoDecodeError (a TokenReduceError and RuntimeError) names the path and every backend
tried with what went wrong: a missing file, an unreadable / corrupt file, a file without a video
stream or without a single decodable frame, an index out of range.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np

from tokenreduce.errors import TokenReduceError, choices

BACKENDS = ("auto", "decord", "pyav")


class VideoDecodeError(TokenReduceError, RuntimeError):
    """A video could not be decoded by any backend."""


def available_backends() -> list:
    """The decoding backends importable here, in the order "auto" tries them."""
    out = []
    try:
        import decord  # noqa: F401
        out.append("decord")
    except ImportError:
        pass
    try:
        import av  # noqa: F401
        out.append("pyav")
    except ImportError:
        pass
    return out


# -- sampling ------------------------------------------------------------------------------------
def _check_count(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"num_frames must be a whole number >= 1, got {k!r}")
    return int(k)


def _check_fps(fps) -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)) \
            or not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
    return float(fps)


def uniform_indices(total: int, k: int) -> np.ndarray:
    """k indices spread evenly over [0, total-1], endpoints included, rounded."""
    k = _check_count(k)
    if total <= 0:
        raise ValueError("the video has no frames")
    return np.linspace(0, total - 1, k).round().astype(np.int64)


def fps_indices(total: int, native_fps: float, fps: float) -> np.ndarray:
    """One frame every 1/fps seconds from t=0 (each frame at most once)."""
    fps = _check_fps(fps)
    if not native_fps or native_fps <= 0:
        raise ValueError("the video reports no frame rate, so fps-based sampling is impossible; use num_frames")
    step = native_fps / fps
    if step <= 1:  # at or above the native rate: every frame (without a huge arange)
        return np.arange(total, dtype=np.int64)
    idx = np.round(np.arange(0, total, step)).astype(np.int64)
    idx = idx[idx < total]
    return np.unique(idx)


def constant_rate(timestamps, native_fps: float) -> bool:
    """Whether every frame sits within half a frame of i / native_fps (then index arithmetic is
    exact and fps sampling uses it)."""
    if timestamps is None or not native_fps:
        return True
    ts = np.asarray(timestamps, np.float64)
    return bool(np.abs(ts - np.arange(len(ts)) / native_fps).max() <= 0.5 / native_fps)


def time_indices(timestamps, fps: float) -> np.ndarray:
    """Variable frame rate: for t = 0, 1/fps, 2/fps, ... up to the last frame's time, the frame
    shown at t (the last one starting at or before it); each frame at most once. Computed per
    frame (is a multiple of 1/fps inside its display interval?), so any fps costs O(frames)."""
    fps = _check_fps(fps)
    ts = np.asarray(timestamps, np.float64)
    eps = 1e-9
    first_t = np.ceil((ts - eps) * fps) / fps            # the first target at or after each start
    ends = np.append(ts[1:], ts[-1] + 2 * eps)            # the last frame is shown up to its own time
    return np.flatnonzero(first_t + eps < ends).astype(np.int64)


def sample_indices(total: int, native_fps: float | None = None, *, num_frames: int | None = None,
                   fps: float | None = None, indices=None, timestamps=None) -> np.ndarray:
    """The frame indices `read_frames` decodes (see the module docstring for the conventions).
    `timestamps` (seconds per frame): a variable-rate video's fps sampling follows them."""
    if indices is not None:
        if num_frames is not None or fps is not None:
            raise ValueError("give either indices or num_frames / fps, not both")
        given = np.asarray(indices)
        if given.ndim > 1 or (given.size and given.dtype.kind not in "iu"):
            raise ValueError(f"indices must be a flat list of whole frame numbers, got {indices!r}")
        idx = given.astype(np.int64).reshape(-1)
        bad = idx[(idx < 0) | (idx >= total)]
        if bad.size:
            raise IndexError(f"frame indices {bad.tolist()} out of range; the video has {total} frames (0..{total - 1})")
        return idx
    if fps is not None:
        vfr = timestamps is not None and not constant_rate(timestamps, native_fps)
        idx = time_indices(timestamps, fps) if vfr else fps_indices(total, native_fps, fps)
        if num_frames is not None and len(idx) > _check_count(num_frames):
            idx = idx[uniform_indices(len(idx), num_frames)]
        return idx
    if num_frames is not None:
        return uniform_indices(total, num_frames)
    return np.arange(total, dtype=np.int64)


# -- backends ------------------------------------------------------------------------------------
class _Reader:
    """What both backends share: path, total, fps, and the frames' own times."""
    path: str
    total: int
    fps: float
    lead_lost = False  # the container lists leading frames that are never shown (shown_frames)

    def timestamps(self):
        # from the packets' pts, read with PyAV, for both backends: decord reports AV_NOPTS or
        # zeros for some containers (AVI, MPEG-PS)
        return packet_times(self.path, self.total, self.fps)


class _Decord(_Reader):
    name = "decord"

    def __init__(self, path):
        import decord
        self.path = str(path)
        self.vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        self.fps = float(self.vr.get_avg_fps() or 0.0)
        shown = shown_frames(path)
        # len(vr) also counts leading frames never shown, and decord's seeks count frames from a
        # keyframe, so the same index gives different frames after different reads: then only
        # reading from the start, frame after frame, gives frame i as the i-th shown
        self.in_order = self.lead_lost = shown is not None
        self.total = len(self.vr) if shown is None else shown[0]

    def get(self, idx: np.ndarray) -> np.ndarray:
        if len(idx) == 0:
            return np.zeros((0, 0, 0, 3), np.uint8)
        if not self.in_order:
            return self.vr.get_batch([int(i) for i in idx]).asnumpy()
        want = set(int(i) for i in idx)  # freshly opened: next() starts at the first decoded frame
        got = {}
        for i in range(max(want) + 1):
            frame = self.vr.next()
            if i in want:
                got[i] = frame.asnumpy()
        return np.stack([got[int(i)] for i in idx])

    def close(self):
        del self.vr


class _PyAV(_Reader):
    name = "pyav"

    def __init__(self, path):
        import av
        self.path = str(path)
        self.container = av.open(self.path)
        if not self.container.streams.video:
            self.container.close()
            raise ValueError("no video stream")
        st = _video_stream(self.container)
        rate = st.average_rate or st.guessed_rate or st.base_rate
        self.fps = float(rate) if rate else 0.0
        total = int(st.frames or 0)
        if total <= 0:  # the container does not say: count the video packets, then start afresh
            total = sum(1 for p in self.container.demux(st) if p.size)
            self.container.close()
            self.container = av.open(self.path)
        shown = shown_frames(path)  # the container's count also lists leading frames never shown
        self.total = total if shown is None else shown[0]
        self.first_pts = None if shown is None else shown[1]
        self.lead_lost = shown is not None

    def get(self, idx: np.ndarray) -> np.ndarray:
        """Decode sequentially up to the largest index (exact: no keyframe-seek rounding)."""
        if len(idx) == 0:
            return np.zeros((0, 0, 0, 3), np.uint8)
        want = set(int(i) for i in idx)
        last = max(want)
        got = {}
        c = self.container  # freshly opened: decoding starts at the first frame
        st = _video_stream(c)
        st.thread_type = "AUTO"
        decoded = 0
        frames = c.decode(st)
        if self.first_pts is not None:  # a lost lead: frames made without their references are not shown
            frames = (f for f in frames if f.pts is None or f.pts >= self.first_pts)
        for i, frame in enumerate(frames):
            decoded = i + 1
            if i in want:
                got[i] = upright(frame.to_ndarray(format="rgb24"), getattr(frame, "rotation", 0))
            if i >= last:
                break
        missing = sorted(want - set(got))
        if missing:
            raise ValueError(f"only {decoded} of the {self.total} frames the container lists could be decoded; "
                             f"frames {missing[:5]} are missing")
        return np.stack([got[int(i)] for i in idx])

    def close(self):
        self.container.close()


FRAME_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _natural_key(name: str):
    """frame_2.jpg before frame_10.jpg: digit runs compare as numbers"""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name.lower()) if t]


def frame_files(folder) -> list:
    """The frame images of a folder (FRAME_EXTS), in natural name order: the frames read_frames reads"""
    return sorted((f for f in os.listdir(folder) if f.lower().endswith(FRAME_EXTS)
                   and os.path.isfile(os.path.join(folder, f))), key=_natural_key)


class _Folder(_Reader):
    """A folder of frame images, in natural name order, at a given frame rate."""
    name = "frames"

    def __init__(self, path, frame_rate):
        self.path = str(path)
        self.files = frame_files(path)
        self.total = len(self.files)
        self.fps = float(frame_rate or 0.0)

    def timestamps(self):
        return None  # frames sit at i / frame_rate

    def get(self, idx: np.ndarray) -> np.ndarray:
        from PIL import Image
        if len(idx) == 0:
            return np.zeros((0, 0, 0, 3), np.uint8)
        frames = {}
        for i in dict.fromkeys(int(i) for i in idx):
            with Image.open(os.path.join(self.path, self.files[i])) as im:
                frames[i] = np.asarray(im.convert("RGB"))
        sizes = {f.shape for f in frames.values()}
        if len(sizes) > 1:
            raise ValueError(f"the frame images differ in size: {sorted(sizes)}")
        return np.stack([frames[int(i)] for i in idx])

    def close(self):
        pass


def _packet_info(container, st):
    """(pts, keyframe, discard) of the stream's packets, in decode order, without decoding"""
    return ((p.pts, p.is_keyframe, p.is_discard) for p in container.demux(st) if p.size)


def _lead_lost(packets) -> bool:
    """Whether some leading frames are never shown: the first packet is not a keyframe (a cut
    made by stream copy from mid-GOP), or a packet of the first GOP is marked discard (an MP4
    edit list hides it; the mov demuxer starts at the keyframe before the edit). Reads packets
    up to the second keyframe only."""
    for k, (_, key, discard) in enumerate(packets):
        if discard or (k == 0 and not key):
            return True
        if key and k > 0:
            return False
    return False


def _shown_pts(packets: list):
    """(pts of the frames shown, the pts they start from or None) for a stream's packets: all of
    them, unless the lead is lost (_lead_lost); then neither the discarded ones (the decoder
    drops their frames, using them only as references) nor those shown before the first keyframe
    (their references are not in the file: FFmpeg drops them, or for MPEG-4 Part 2 makes them
    from a grey picture; decord's and PyAV's FFmpeg differ there). A stream without a single
    keyframe flag counts whole here (shown_frames tells a container that flags none from a cut
    that holds none)."""
    first_key = next((p for p, key, _ in packets if key), None)
    if first_key is None or not _lead_lost(iter(packets)):
        return [p for p, _, _ in packets], None
    return [p for p, _, discard in packets if not discard and (p is None or p >= first_key)], first_key


def shown_frames(path):
    """(count, first pts) of the frames shown where the container's frame count also lists
    leading frames that are never shown (_shown_pts), from the packets, nothing decoded ((0, None)
    for a cut without a keyframe: nothing decodes). None when it lists none (the common case,
    told from the first GOP's packets) or PyAV cannot tell (missing, or the file unreadable).
    Remembered per file version (path, size, mtime): one read asks from several places."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _shown_frames_of(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _shown_frames_of(path: str, size: int, mtime_ns: int):
    try:
        import av
        with av.open(str(path)) as c:
            if not _lead_lost(_packet_info(c, _video_stream(c))):
                return None
        with av.open(str(path)) as c:
            pts, first = _shown_pts(list(_packet_info(c, _video_stream(c))))
        if first is None:  # no keyframe flag: a container that flags none, or a cut holding none
            with av.open(str(path)) as c:
                return None if next(c.decode(_video_stream(c)), None) is not None else (0, None)
        return len(pts), first
    except Exception:  # noqa: BLE001 - unreadable here: the decoder reports that itself
        return None


def packet_times(path, total: int, fps: float):
    """(total,) presentation times in seconds from the first frame: the pts of the video packets
    whose frames are shown (_shown_pts), in display order, read with PyAV. None when PyAV is
    missing or the times are not usable (a packet without pts, a count that differs from
    `total`, times that do not increase, or a span far beyond total / fps): then the average
    rate serves."""
    try:
        import av
        with av.open(str(path)) as c:
            st = _video_stream(c)
            packets = list(_packet_info(c, st))
            base = float(st.time_base)
        pts = _shown_pts(packets)[0]
    except Exception:  # noqa: BLE001 - unreadable here: the decoder reports that itself
        return None
    if len(pts) != total or total == 0 or any(p is None for p in pts):
        return None
    ts = np.sort(np.asarray(pts, np.float64)) * base
    ts -= ts[0]
    if len(ts) > 1 and (not np.all(np.diff(ts) > 0) or (fps and ts[-1] > 2.0 * total / fps + 1.0)):
        return None
    return ts


def _video_stream(container):
    """The stream FFmpeg (and decord) would pick: the best video stream, not merely the first."""
    try:
        return container.streams.best("video") or container.streams.video[0]
    except AttributeError:  # older PyAV
        return container.streams.video[0]


def upright(frame: np.ndarray, rotation) -> np.ndarray:
    """A decoded (H, W, 3) frame turned as its display matrix says (`rotation`: degrees
    counter-clockwise, FFmpeg's convention; a phone's portrait video reads -90)."""
    k = int(round(float(rotation or 0) / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(frame, k)) if k else frame


def _pyav_first(path) -> str | None:
    """Why "auto" should decode this file with PyAV rather than decord, or None: decord returns
    shifted frames for MPEG-TS with reordered (B-) frames and ignores or mangles rotation. A lost
    lead (shown_frames) decord reads in order from the start, right only where its decoder drops
    the frames made without their references; PyAV sees their times and skips them."""
    try:
        import av
        with av.open(str(path)) as c:
            if "mpegts" in (c.format.name or ""):
                return "MPEG-TS"
            st = _video_stream(c) if c.streams.video else None
            frame = next(c.decode(st), None) if st is not None else None
            if frame is not None and int(round(float(getattr(frame, "rotation", 0) or 0))) % 360:
                return "rotated"
        if st is not None and shown_frames(path) is not None:
            return "leading frames not shown"
    except Exception:  # noqa: BLE001 - the backends report unreadable files themselves
        return None
    return None


_OPENERS = {"decord": _Decord, "pyav": _PyAV}


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    msg = msg[-1] if msg else ""
    return f"{type(exc).__name__}: {msg[:200]}" if msg else type(exc).__name__


def read_frames(path, num_frames: int | None = None, fps: float | None = None, indices=None,
                backend: str = "auto", frame_rate: float | None = None):
    """Decode frames of the video at `path`.

    Returns (frames, meta): frames is a (T, H, W, 3) uint8 RGB numpy array; meta is a dict
    with `indices` (the decoded frame indices), `fps` (the video's average frame rate),
    `total` (its frame count), `backend` ("decord" or "pyav"), `timestamps` (seconds) and
    `path`. backend: "auto" (decord, then PyAV if decord is missing or fails), "decord" or
    "pyav". A folder of frame images reads as a video (backend "frames") at `frame_rate`
    frames per second (ignored for files, whose rate is their own).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of: {choices(BACKENDS)}")
    path = Path(os.fspath(path))
    if not path.exists():
        raise VideoDecodeError(f"cannot read video {str(path)!r}: no such file")
    if path.is_dir():
        try:  # checked for folders only: a file's rate is its own, frame_rate is ignored there
            frame_rate = None if frame_rate is None else _check_fps(frame_rate)
        except ValueError as exc:
            raise VideoDecodeError(f"cannot read frame folder {str(path)!r}: frame_rate: {exc}") from None
        return _read_folder(path, num_frames, fps, indices, frame_rate)
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"cannot read video {str(path)!r}: the file is empty (0 bytes)")
    order = available_backends() if backend == "auto" else [backend]
    if backend == "auto" and order[:1] == ["decord"] and "pyav" in order and _pyav_first(path):
        order = ["pyav"]
    if not order:
        raise VideoDecodeError(f"cannot read video {str(path)!r}: no decoding backend installed; "
                               "pip install decord (x86-64 Linux/Windows) or av")
    errors = []
    for name in order:
        try:
            reader = _OPENERS[name](path)
        except ImportError as exc:
            errors.append(f"{name}: not installed ({exc})")
            continue
        except Exception as exc:  # noqa: BLE001 - a decoder's own error type varies; we report it
            errors.append(f"{name}: {_describe(exc)}")
            continue
        try:
            if reader.total <= 0:
                errors.append(f"{name}: the video stream has no frames" + (
                    " that can be shown: it starts on a non-key frame and holds no keyframe, or an edit list "
                    "hides every frame (a cut made by stream copy?); re-encode the clip, or cut it at a keyframe"
                    if reader.lead_lost else ""))
                continue
            # the frames' own times (both backends: one demux pass, no decoding), read when fps
            # sampling or the decoded frames' timestamps need them (video_info decodes none)
            ts = reader.timestamps() if fps is not None else None
            try:
                idx = sample_indices(reader.total, reader.fps, num_frames=num_frames, fps=fps, indices=indices,
                                     timestamps=ts)
            except (ValueError, IndexError) as exc:  # the caller's request, not the decoder: no fallback
                raise VideoDecodeError(f"cannot read video {str(path)!r}: {exc}") from None
            if ts is None and len(idx):
                ts = reader.timestamps()
            try:
                frames = reader.get(idx)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{name}: {_describe(exc)}")
                continue
            fps_v = reader.fps
            if ts is not None and not constant_rate(ts, fps_v):
                times = ts[idx].tolist()
            else:  # constant rate (or no timestamps): index / average rate, the same for both backends
                times = (idx / fps_v).tolist() if fps_v else None
            meta = {"indices": idx.tolist(), "fps": fps_v, "total": reader.total, "backend": name,
                    "timestamps": times, "path": str(path)}
            return frames, meta
        finally:
            try:
                reader.close()
            except Exception:  # noqa: BLE001
                pass
    no_frames = any("no frames" in e or "no video stream" in e for e in errors)
    what = "contains no decodable video frames" if no_frames else "could not be decoded (missing codec or corrupt file?)"
    raise VideoDecodeError(f"video {str(path)!r} {what}; backends tried: " + "; ".join(errors))


def _read_folder(path: Path, num_frames, fps, indices, frame_rate):
    reader = _Folder(path, frame_rate)
    if reader.total == 0:
        raise VideoDecodeError(f"cannot read video {str(path)!r}: it is a folder without frame images "
                               f"({choices(FRAME_EXTS)})")
    if fps is not None and not frame_rate:
        raise VideoDecodeError(f"cannot read video {str(path)!r}: fps sampling of a frame folder needs its "
                               "frame_rate (a folder stores none); pass frame_rate=, or use num_frames")
    try:
        idx = sample_indices(reader.total, reader.fps, num_frames=num_frames, fps=fps, indices=indices)
    except (ValueError, IndexError) as exc:
        raise VideoDecodeError(f"cannot read video {str(path)!r}: {exc}") from None
    try:
        frames = reader.get(idx)
    except Exception as exc:  # noqa: BLE001 - PIL's error types vary; the message names the file
        raise VideoDecodeError(f"cannot read frame folder {str(path)!r}: {_describe(exc)}") from None
    times = (idx / reader.fps).tolist() if reader.fps else None
    return frames, {"indices": idx.tolist(), "fps": reader.fps, "total": reader.total, "backend": reader.name,
                    "timestamps": times, "path": str(path)}


def video_info(path, backend: str = "auto", frame_rate: float | None = None) -> dict:
    """Frame count, frame rate and backend of a video (or frame folder), without decoding its frames."""
    frames, meta = read_frames(path, indices=[], backend=backend, frame_rate=frame_rate)
    del frames
    return {k: meta[k] for k in ("total", "fps", "backend", "path")}


def frame_times(path, backend: str = "auto", info: dict | None = None):
    """(total,) presentation times in seconds from the first frame for a variable-rate video;
    None when the frames sit at i / average rate (then index arithmetic is exact) or the
    container gives no usable times. `info`: the video's `video_info`, when the caller has it."""
    info = info if info is not None else video_info(path, backend=backend)
    if os.path.isdir(path):
        return None  # a frame folder: frames at i / frame_rate
    ts = packet_times(path, info["total"], info["fps"])
    return None if ts is None or constant_rate(ts, info["fps"]) else ts
