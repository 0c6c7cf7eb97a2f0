"""Video decoding: decord and PyAV agree on indices and pixels; sampling rules; clear errors."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

av = pytest.importorskip("av")

from tokenreduce.eval.video import (VideoDecodeError, available_backends, fps_indices, read_frames,
                                    sample_indices, uniform_indices, video_info)

HAS_DECORD = "decord" in available_backends()


def synth_frames(n=20, h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    out = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i, ..., 0] = (np.arange(w)[None] * 4 + i * 11) % 256
        out[i, ..., 1] = (np.arange(h)[:, None] * 5 + i * 3) % 256
        out[i, ..., 2] = rng.integers(0, 256, (h, w))
    return out


def write_video(path, frames, codec, pix_fmt, fps=8, options=None, rotation=None, times=None):
    """rotation: a display rotation in degrees; times: each frame's time in seconds (VFR)"""
    import fractions
    c = av.open(str(path), "w")
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
    if options:
        s.options = options
    if rotation is not None:
        s.set_display_rotation(rotation)
    if times is not None:
        s.time_base = fractions.Fraction(1, 1000)
    for i, img in enumerate(frames):
        f = av.VideoFrame.from_ndarray(img, format="rgb24")
        if times is not None:
            f.pts, f.time_base = round(times[i] * 1000), s.time_base
        for p in s.encode(f):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    frames = synth_frames()
    out = {"frames": frames}
    try:  # lossless RGB H.264: both decoders must return exactly the frames written
        out["rgb"] = write_video(d / "rgb.mkv", frames, "libx264rgb", "rgb24", options={"qp": "0"})
    except Exception:  # a PyAV build without x264: FFV1 is lossless too
        out["rgb"] = write_video(d / "rgb.mkv", frames, "ffv1", "bgr0")
    out["yuv"] = write_video(d / "yuv.mp4", frames, "mpeg4", "yuv420p")  # the common lossy case
    return out


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
@pytest.mark.parametrize("which", ["rgb", "yuv"])
@pytest.mark.parametrize("request_kw", [dict(num_frames=7), dict(fps=3), dict(indices=[0, 19, 4, 4]), dict()])
def test_decord_and_pyav_agree(clips, which, request_kw):
    fd, md = read_frames(clips[which], backend="decord", **request_kw)
    fp, mp = read_frames(clips[which], backend="pyav", **request_kw)
    assert md["backend"] == "decord" and mp["backend"] == "pyav"
    assert md["indices"] == mp["indices"]
    assert md["total"] == mp["total"] == 20
    assert md["fps"] == pytest.approx(mp["fps"]) == pytest.approx(8.0)
    assert fd.dtype == fp.dtype == np.uint8 and fd.shape == fp.shape
    assert np.array_equal(fd, fp)
    if which == "rgb":  # lossless: the very pixels that were written
        assert np.array_equal(fd, clips["frames"][md["indices"]])


def test_auto_prefers_decord_and_falls_back(clips):
    f, m = read_frames(clips["rgb"], num_frames=4)
    assert m["backend"] == ("decord" if HAS_DECORD else "pyav")
    assert f.shape == (4, 48, 64, 3)
    info = video_info(clips["rgb"])
    assert info["total"] == 20 and info["fps"] == pytest.approx(8.0)


def test_sampling_conventions():
    assert uniform_indices(20, 7).tolist() == np.linspace(0, 19, 7).round().astype(int).tolist()
    assert uniform_indices(20, 1).tolist() == [0]
    assert uniform_indices(3, 5).tolist() == [0, 0, 1, 2, 2]  # k > n repeats frames
    assert fps_indices(20, 8.0, 3.0).tolist() == [0, 3, 5, 8, 11, 13, 16, 19]
    assert fps_indices(10, 8.0, 30.0).tolist() == list(range(10))  # above the native rate: every frame once
    assert sample_indices(20, 8.0, fps=3.0, num_frames=4).tolist() == [0, 5, 13, 19]
    assert sample_indices(5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(IndexError, match="out of range"):
        sample_indices(5, indices=[5])
    with pytest.raises(ValueError, match="either indices"):
        sample_indices(5, indices=[1], num_frames=2)


def test_missing_file(tmp_path):
    with pytest.raises(VideoDecodeError, match="no such file") as e:
        read_frames(tmp_path / "nope.mp4")
    assert "nope.mp4" in str(e.value)


def test_corrupt_file(tmp_path):
    p = tmp_path / "corrupt.mp4"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoDecodeError) as e:
        read_frames(p)
    msg = str(e.value)
    assert "corrupt.mp4" in msg and "pyav" in msg and ("decord" in msg or not HAS_DECORD)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.mp4"
    p.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty"):
        read_frames(p)


def test_zero_frame_file(tmp_path):
    p = tmp_path / "zero.avi"
    c = av.open(str(p), "w")
    s = c.add_stream("mpeg4", rate=8)
    s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
    c.start_encoding()
    c.close()
    with pytest.raises(VideoDecodeError, match="no decodable video frames") as e:
        read_frames(p, num_frames=4)
    assert "zero.avi" in str(e.value)


def test_bad_arguments(clips):
    with pytest.raises(ValueError, match="auto, decord, pyav"):
        read_frames(clips["rgb"], backend="opencv")
    with pytest.raises(VideoDecodeError, match="out of range"):
        read_frames(clips["rgb"], indices=[25], backend="pyav")
    with pytest.raises(VideoDecodeError, match="fps must be a finite number > 0"):
        read_frames(clips["rgb"], fps=0, backend="pyav")
    # every malformed request is the caller's error, said as such (not a ZeroDivisionError /
    # OverflowError / TypeError, and not silently truncated or flattened)
    for kw, says in ((dict(fps=float("inf")), "fps must be a finite number"), (dict(fps="2"), "fps must be"),
                     (dict(fps=float("nan")), "fps must be"), (dict(num_frames=float("inf")), "num_frames must be"),
                     (dict(num_frames=2.7), "num_frames must be a whole number"), (dict(num_frames=True), "num_frames"),
                     (dict(fps=2, num_frames=1.5), "num_frames must be"),
                     (dict(indices=[[1, 2], [3, 4]]), "flat list"), (dict(indices=[1.5]), "whole frame numbers")):
        with pytest.raises(VideoDecodeError, match=says):
            read_frames(clips["rgb"], backend="pyav", **kw)


def _with_rotation(src, dst, degrees):
    """A copy of `src` whose video stream carries a display rotation (a phone's portrait clip)."""
    return write_video(dst, read_frames(src, backend="pyav")[0], "mpeg4", "yuv420p", rotation=degrees)


@pytest.mark.parametrize("degrees", [-90, 90, 180])
def test_rotated_video_comes_upright_from_every_backend_auto_uses(clips, tmp_path, degrees):
    """the display matrix is applied (FFmpeg's convention: degrees counter-clockwise); "auto"
    decodes a rotated file with PyAV (decord fails on 90 degrees and returned 180 turned)"""
    path = _with_rotation(clips["yuv"], tmp_path / f"rot{degrees}.mp4", degrees)
    plain = read_frames(clips["yuv"], num_frames=4, backend="pyav")[0]
    fr, meta = read_frames(path, num_frames=4)
    assert meta["backend"] == "pyav" or not HAS_DECORD
    want = np.rot90(plain, degrees // 90, axes=(1, 2))
    assert fr.shape == want.shape and np.abs(fr.astype(int) - want).mean() < 3


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
def test_mpeg_ts_with_b_frames_is_decoded_by_pyav_under_auto(tmp_path):
    """decord shifts the frames of an MPEG-TS whose frames are reordered (B-frames) and pads the
    tail with the last one; "auto" reads such files with PyAV, which gets them right"""
    frames = synth_frames(n=30)
    try:
        path = write_video(tmp_path / "b.ts", frames, "libx264", "yuv420p", fps=10)
    except Exception:  # noqa: BLE001 - no x264 in this PyAV build
        path = write_video(tmp_path / "b.ts", frames, "mpeg2video", "yuv420p", fps=10)
    fr, meta = read_frames(path, num_frames=5)
    assert meta["backend"] == "pyav"
    idx = np.array(meta["indices"])
    err = lambda shift: np.abs(fr[..., :2].astype(int) - frames[np.clip(idx + shift, 0, 29)][..., :2]).mean()  # noqa: E731
    # the frames asked for, not their neighbours (lossy coding: compare the smooth channels)
    assert err(0) < min(err(-1), err(1))
    assert err(0) * 3 < np.abs(read_frames(path, num_frames=5, backend="decord")[0][..., :2].astype(int)
                               - frames[idx][..., :2]).mean()


VFR_TIMES = [0.1 * i for i in range(10)] + [0.9 + 0.5 * (i + 1) for i in range(10)]


def write_vfr(path):
    """10 frames 0.1 s apart, then 10 frames 0.5 s apart (VFR_TIMES)"""
    return write_video(path, synth_frames(n=20), "libx264", "yuv420p", fps=10, times=VFR_TIMES)


def test_variable_frame_rate_fps_sampling_follows_the_frames_own_times(tmp_path):
    """fps=2 takes the frame shown at every half second (not i * average rate), `timestamps`
    are the frames' own times, and a clip window (meta.start / end) selects by them; both
    backends agree, and a constant-rate clip keeps the index arithmetic"""
    from tokenreduce.eval.video import frame_times
    from tokenreduce.eval.videoqa import _clip_window
    path, times, frames = write_vfr(tmp_path / "vfr.mp4"), VFR_TIMES, synth_frames(n=20)
    # the frame shown at t = 0, 0.5, ..., 5.5 s (the last to start at or before t)
    want = sorted({max(i for i in range(20) if times[i] <= k * 0.5 + 1e-9) for k in range(12)})
    assert want[:4] == [0, 5, 9, 10] and want[-2:] == [17, 18]  # dense, then every frame
    for backend in ["pyav"] + (["decord"] if HAS_DECORD else []):
        _, meta = read_frames(path, fps=2, backend=backend)
        assert meta["indices"] == want, backend
        assert np.allclose(meta["timestamps"], [times[i] for i in meta["indices"]], atol=2e-3), backend
    # 1.0 s to 3.0 s: frames 9 (shown from 0.9 s) .. 13 (2.9 s); by the average rate (3.85 fps)
    # it was 4 .. 12; a window between two frames' starts gets the frame on screen
    assert _clip_window({"video": str(path), "meta": {"start": 1.0, "end": 3.0}}) == (9, 13)
    assert _clip_window({"video": str(path), "meta": {"start": 1.5, "end": 1.8}}) == (10, 10)
    for backend in ["pyav"] + (["decord"] if HAS_DECORD else []):  # the frames' own times, whatever is asked
        _, meta = read_frames(path, num_frames=4, backend=backend)
        assert np.allclose(meta["timestamps"], [times[i] for i in meta["indices"]], atol=2e-3), backend
    assert np.allclose(frame_times(path), times, atol=2e-3)
    cfr = write_video(tmp_path / "cfr.mp4", frames, "mpeg4", "yuv420p", fps=8)
    _, meta = read_frames(cfr, fps=3, backend="pyav")
    assert meta["indices"] == fps_indices(20, 8.0, 3).tolist() and frame_times(cfr) is None


def test_containers_whose_timestamps_decord_cannot_give_keep_the_index_arithmetic(tmp_path):
    """H.264 in AVI: decord reports no presentation times (AV_NOPTS / zeros); the packets' own
    times (or the average rate) serve both backends, so fps sampling and timestamps stay right"""
    frames = synth_frames(n=40)
    path = write_video(tmp_path / "h264.avi", frames, "libx264", "yuv420p", fps=10)
    for backend in ["pyav"] + (["decord"] if HAS_DECORD else []):
        _, meta = read_frames(path, fps=2, backend=backend)
        assert meta["indices"] == list(range(0, 40, 5)), backend
        assert np.allclose(meta["timestamps"], np.arange(0, 40, 5) / 10), backend
    # a request far above the native rate takes every frame, without a huge index array
    assert read_frames(path, fps=1e9, indices=None, backend="pyav")[1]["indices"] == list(range(40))


def test_a_folder_of_frame_images_reads_as_a_video(tmp_path):
    """MVBench's TVQA clips are folders of JPEGs at 3 fps: frames in natural name order, the
    usual sampling, fps sampling and timestamps from the rate the caller gives"""
    from PIL import Image

    from tokenreduce.eval.video import frame_times, video_info
    clip = tmp_path / "clip"
    clip.mkdir()
    for i in range(1, 13):  # frame_2 before frame_10
        Image.fromarray(np.full((6, 10, 3), i * 10, np.uint8)).save(clip / f"frame_{i}.png")
    (clip / "notes.txt").write_text("not a frame")
    frames, meta = read_frames(clip, num_frames=4)
    assert frames.shape == (4, 6, 10, 3) and meta["backend"] == "frames" and meta["total"] == 12
    assert meta["indices"] == [0, 4, 7, 11] and frames[:, 0, 0, 0].tolist() == [10, 50, 80, 120]
    frames, meta = read_frames(clip, fps=1, frame_rate=3)
    assert meta["indices"] == [0, 3, 6, 9] and meta["timestamps"] == [0.0, 1.0, 2.0, 3.0]
    assert video_info(clip, frame_rate=3) == {"total": 12, "fps": 3.0, "backend": "frames", "path": str(clip)}
    assert frame_times(clip) is None
    with pytest.raises(VideoDecodeError, match="needs its frame_rate"):
        read_frames(clip, fps=1)
    with pytest.raises(VideoDecodeError, match=r"out of range; the video has 12 frames"):
        read_frames(clip, indices=[12])
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(clip / "frame_13.png")
    with pytest.raises(VideoDecodeError, match="differ in size"):
        read_frames(clip, indices=[0, 12])
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoDecodeError, match=r"a folder without frame images \(.*\.jpg"):
        read_frames(tmp_path / "empty", num_frames=2)


def _gop_source(path, codec, bf=0, n=40):
    """n frames at 10 fps, a keyframe every 10 frames exactly (no scene-cut keyframes)"""
    options = {"g": "10", "bf": str(bf)} | ({"sc_threshold": "0"} if codec == "libx264" else {})
    return write_video(path, synth_frames(n=n), codec, "yuv420p", fps=10, options=options)


def _copy_packets(src, dst, first, hide=0):
    """dst: src's video packets copied as they are (no re-encoding, as `ffmpeg -c copy` does) from
    the `first`-th in decode order on; `hide` > 0 moves the times back so that the first `hide`
    frames shown fall before t = 0, which an MP4 muxer writes as an edit list hiding them"""
    with av.open(str(src)) as i, av.open(str(dst), "w") as o:
        ist = i.streams.video[0]
        ost = o.add_stream_from_template(ist)
        packets = [p for p in i.demux(ist) if p.size][first:]
        off = sorted(p.pts for p in packets)[hide] if hide else 0
        for p in packets:
            p.pts, p.dts, p.stream = p.pts - off, p.dts - off, ost
            o.mux(p)
    return dst


def _closest(decoded, source):
    """the source frame each decoded frame is closest to (lossy coding: on the smooth channels)"""
    d = np.abs(decoded[:, None, ..., :2].astype(np.int16) - source[None, ..., :2]).mean(axis=(2, 3, 4))
    return d.argmin(1).tolist()


def _backends():
    return ["pyav", "auto"] + (["decord"] if HAS_DECORD else [])


@pytest.mark.parametrize("codec,ext,bf", [("libx264", "mp4", 2), ("libx264", "mkv", 0), ("mpeg4", "mkv", 0)])
def test_a_cut_starting_on_a_non_key_frame_reads_the_frames_shown(tmp_path, codec, ext, bf):
    """a stream-copied cut that starts 3 packets into a 10-frame GOP lists 37 frames, but the 7
    before the next keyframe lack their references (FFmpeg drops them; for MPEG-4 PyAV's makes
    them from grey, decord's drops them): 30 frames (source 10..39) are shown. They are the
    video, indexed and timed from the first, by both backends. Before, both counted 37: PyAV
    refused the last 7 indices, and decord's indices mixed two counts (frames decoded from the
    start, its frame table after a seek): num_frames=5 gave source [10, 12, 21, 30, 39]."""
    source = synth_frames(n=40)
    src = _gop_source(tmp_path / "src.mp4", codec, bf)
    cut = _copy_packets(src, tmp_path / f"cut.{ext}", 3)
    with av.open(str(cut)) as c:  # the file really is such a cut: 37 packets, the first not a keyframe
        packets = [p for p in c.demux(c.streams.video[0]) if p.size]
    assert len(packets) == 37 and not packets[0].is_keyframe
    for backend in _backends():
        assert video_info(cut, backend=backend)["total"] == 30, backend
        fr, meta = read_frames(cut, num_frames=6, backend=backend)
        assert meta["total"] == 30 and meta["indices"] == [0, 6, 12, 17, 23, 29], backend
        assert _closest(fr, source) == [10 + i for i in meta["indices"]], backend
        assert np.allclose(meta["timestamps"], np.array(meta["indices"]) / 10), backend
        assert meta["backend"] == ("pyav" if backend == "auto" else backend)
        # a later read after a seek-sized jump, and out of order: still frame 10 + i
        fr, meta = read_frames(cut, indices=[25, 3, 29], backend=backend)
        assert _closest(fr, source) == [35, 13, 39], backend
        with pytest.raises(VideoDecodeError, match="the video has 30 frames"):
            read_frames(cut, indices=[30], backend=backend)
    if HAS_DECORD:
        assert np.array_equal(read_frames(cut, backend="decord")[0], read_frames(cut, backend="pyav")[0])


@pytest.mark.parametrize("bf", [0, 2])
def test_an_mp4_edit_list_hiding_leading_frames_reads_the_frames_shown(tmp_path, bf):
    """30 packets from a keyframe on, whose first 3 frames an edit list hides (what `ffmpeg -ss
    -c copy` writes for a cut between keyframes): 27 frames (source 13..39) are shown, indexed and
    timed from the first. Before, both backends counted 30: PyAV refused indices 27..29, and
    decord's were off by 3 or not depending on the seek (num_frames=5: source [13, 20, 24, 32,
    39]; read in order it repeated the last frame)."""
    source = synth_frames(n=40)
    src = _gop_source(tmp_path / "src.mp4", "libx264", bf)
    clip = _copy_packets(src, tmp_path / "edit.mp4", 10, hide=3)
    with av.open(str(clip)) as c:  # the file really holds 3 hidden frames: the mov demuxer marks them discard
        st = c.streams.video[0]
        packets = [p for p in c.demux(st) if p.size]
    assert st.frames == 30 and sum(p.is_discard for p in packets) == 3
    for backend in _backends():
        assert video_info(clip, backend=backend)["total"] == 27, backend
        fr, meta = read_frames(clip, num_frames=5, backend=backend)
        assert meta["indices"] == [0, 6, 13, 20, 26], backend
        assert _closest(fr, source) == [13 + i for i in meta["indices"]], backend
        assert np.allclose(meta["timestamps"], np.array(meta["indices"]) / 10), backend
        fr, meta = read_frames(clip, fps=2, backend=backend)
        assert meta["indices"] == list(range(0, 27, 5)), backend
        assert _closest(fr, source) == list(range(13, 40, 5)), backend
        fr, _ = read_frames(clip, indices=[5], backend=backend)  # alone: decord's seek from the start
        assert _closest(fr, source) == [18], backend
    if HAS_DECORD:
        assert np.array_equal(read_frames(clip, backend="decord")[0], read_frames(clip, backend="pyav")[0])


def test_a_cut_without_a_keyframe_is_refused_saying_what_to_do(tmp_path):
    """packets 11..17 of a 10-frame GOP: no keyframe, so nothing decodes (before: 'could not be
    decoded (missing codec or corrupt file?)' after decoding, and video_info reported 7 frames)"""
    src = _gop_source(tmp_path / "src.mp4", "libx264")
    with av.open(str(src)) as i, av.open(str(tmp_path / "nokey.mkv"), "w") as o:
        ist = i.streams.video[0]
        ost = o.add_stream_from_template(ist)
        for p in [p for p in i.demux(ist) if p.size][11:18]:
            p.stream = ost
            o.mux(p)
    for backend in _backends():
        for call in (lambda: video_info(tmp_path / "nokey.mkv", backend=backend),
                     lambda: read_frames(tmp_path / "nokey.mkv", num_frames=2, backend=backend)):
            with pytest.raises(VideoDecodeError, match="no decodable video frames") as e:
                call()
            assert "holds no keyframe" in str(e.value) and "cut it at a keyframe" in str(e.value), backend
