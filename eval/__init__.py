"""Evaluation, benchmarks, video decoding and frame selection. Installed as `tokenreduce.eval`.

Imported lazily, so `import tokenreduce.eval` stays cheap:
    from tokenreduce.eval import read_frames, select_frames, VideoDecodeError
"""

_LAZY = {
    "read_frames": ".video", "video_info": ".video", "VideoDecodeError": ".video", "sample_indices": ".video",
    "select_frames": ".frame_select",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
