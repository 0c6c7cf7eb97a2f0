"""Synthetic video-QA: clips of moving coloured shapes on a cluttered grey background.

Every question needs the right frames and the right tokens (one object covers about one LLM
token of a 64x64 frame), and every answer is a single word picked from four options:

  region_color  "what colour is the shape in the top-left at the start ?"  colour of the one
                object in a quadrant at the first or last frame (objects move across quadrants,
                so the moment matters)
  first_color   "which colour appears first ?"  objects pop in at different frames
  start_end     "where is the red shape at the end ?"  quadrant at the first or last frame
                (start and end quadrants always differ)
  count         "how many circles are there ?"  zero..three of one shape among others
  brief_color   "what colour is the cross ?"  the cross is visible in only one or two frames, so
                frame selection decides whether the model sees it at all

Scenes are sampled answer-first (answers balanced), then rejection-sampled until unambiguous
(no object near a quadrant border at the asked moment, one object per asked quadrant, one first
object). The background clutter is achromatic (grey rectangles and bars), the objects saturated,
so colour never comes from the background but every token carries content: which tokens a
reducer keeps matters. Options name colours present in the scene first, so an answer cannot be
found by elimination.

`write_dataset` renders clips to lossless MP4 (libx264rgb, crf 0; decord and PyAV return the
exact pixels) plus a JSONL in the evaluation format {id, video, question, options, answer, meta}.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

COLORS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 70, 245),
          "yellow": (240, 225, 20), "cyan": (20, 215, 225), "magenta": (215, 35, 220)}
COLOR_NAMES = list(COLORS)
SHAPES = ["circle", "square", "triangle"]          # the cross is reserved for brief objects
QUADRANTS = ["top-left", "top-right", "bottom-left", "bottom-right"]
NUMBERS = ["zero", "one", "two", "three"]
MOMENTS = ["start", "end"]
QTYPES = ["region_color", "first_color", "start_end", "count", "brief_color"]
# per-patch class ids for auxiliary supervision: 0 = background
SHAPE_CLASSES = ["none"] + SHAPES + ["cross"]
COLOR_CLASSES = ["none"] + COLOR_NAMES


class VideoQAGenerator:
    """Deterministic sampler of synthetic video-QA samples (numpy Generator seeded by `seed`).

    frames: clip length; size: frame side in pixels; radius: object radius; qtypes: the
    question types drawn from (uniformly, answers balanced within each type).
    """

    def __init__(self, frames: int = 8, size: int = 64, radius: int = 7, seed: int = 0, qtypes=QTYPES):
        bad = [q for q in qtypes if q not in QTYPES]
        if bad:
            raise ValueError(f"unknown question type(s) {bad}; valid: {', '.join(QTYPES)}")
        if frames < 2:
            raise ValueError(f"frames must be >= 2, got {frames}")
        self.T, self.S, self.r = int(frames), int(size), int(radius)
        self.rng = np.random.default_rng(seed)
        self.qtypes = list(qtypes)
        yy, xx = np.mgrid[0:self.S, 0:self.S]
        self.yy, self.xx = yy + 0.5, xx + 0.5

    # -- scene pieces --------------------------------------------------------------------------
    def _point(self):
        m = self.r + 1
        return self.rng.uniform(m, self.S - m, size=2)

    def _quadrant(self, p, margin: float = 4.0) -> int:
        """quadrant index of a centre (x, y), or -1 when within `margin` of a midline"""
        h = self.S / 2
        if min(abs(p[0] - h), abs(p[1] - h)) < margin:
            return -1
        return (0 if p[1] < h else 2) + (0 if p[0] < h else 1)

    def _point_in(self, q: int):
        h, m = self.S / 2, self.r + 1
        x = self.rng.uniform(m, h - 5) if q % 2 == 0 else self.rng.uniform(h + 5, self.S - m)
        y = self.rng.uniform(m, h - 5) if q < 2 else self.rng.uniform(h + 5, self.S - m)
        return np.array([x, y])

    def _obj(self, color, shape, p0=None, p1=None, visible=None):
        p0 = self._point() if p0 is None else np.asarray(p0, float)
        p1 = self._point() if p1 is None else np.asarray(p1, float)
        t = np.linspace(0.0, 1.0, self.T)[:, None]
        vis = np.ones(self.T, bool) if visible is None else visible
        return dict(color=color, shape=shape, pos=p0 * (1 - t) + p1 * t, vis=vis)

    def _colors(self, n, include=None):
        pool = [c for c in COLOR_NAMES if c != include]
        picked = [str(c) for c in self.rng.choice(pool, n - (include is not None), replace=False)]
        if include is not None:
            picked.insert(int(self.rng.integers(n)), include)
        return picked

    def _options(self, answer, scene_pool, pool):
        """answer + distractors from the scene first, then from the pool; shuffled, 4 in all"""
        others = [c for c in dict.fromkeys(scene_pool) if c != answer]
        self.rng.shuffle(others)
        rest = [c for c in pool if c != answer and c not in others]
        self.rng.shuffle(rest)
        opts = [answer] + (others + rest)[:3]
        self.rng.shuffle(opts)
        return [str(o) for o in opts]

    def _separated(self, objs, frames) -> bool:
        """no two objects overlap at the given frames (so counts and colours are readable)"""
        for t in frames:
            pts = [o["pos"][t] for o in objs if o["vis"][t]]
            for i in range(len(pts)):
                for j in range(i):
                    if np.hypot(*(pts[i] - pts[j])) < 2 * self.r + 2:
                        return False
        return True

    # -- questions -----------------------------------------------------------------------------
    def sample(self, qtype: str | None = None) -> dict:
        """one sample: dict(qtype, question, options, answer, objects, clutter seed)"""
        rng = self.rng
        qt = qtype or self.qtypes[int(rng.integers(len(self.qtypes)))]
        if qt not in QTYPES:
            raise ValueError(f"unknown question type {qt!r}; valid: {', '.join(QTYPES)}")
        T = self.T
        ends = [0, T - 1]
        count_k = int(rng.integers(4))  # drawn once so that counts stay balanced under rejection
        for _ in range(10000):
            if qt == "region_color":
                moment = int(rng.integers(2))
                q = int(rng.integers(4))
                n = int(rng.integers(2, 5))
                cols = self._colors(n)
                target = self._point_in(q)
                objs = [self._obj(cols[0], SHAPES[int(rng.integers(3))],
                                  *((target, None) if moment == 0 else (None, target)))]
                objs += [self._obj(c, SHAPES[int(rng.integers(3))]) for c in cols[1:]]
                t = ends[moment]
                quads = [self._quadrant(o["pos"][t]) for o in objs]
                if -1 in quads or quads.count(q) != 1 or not self._separated(objs, ends):
                    continue
                # the same quadrant at the other moment holds another object or none: the moment matters
                if self._quadrant(objs[0]["pos"][ends[1 - moment]]) == q:
                    continue
                question = f"what colour is the shape in the {QUADRANTS[q]} at the {MOMENTS[moment]} ?"
                answer = cols[0]
                options = self._options(answer, cols[1:], COLOR_NAMES)
                meta = dict(quadrant=QUADRANTS[q], moment=MOMENTS[moment], frames=[t])
            elif qt == "first_color":
                slots = np.arange(0, max(T - 2, 2))  # pop-in frames (each object stays >= 2 frames when T >= 4)
                n = min(int(rng.integers(2, 4)), len(slots))
                cols = self._colors(n)
                starts = np.sort(rng.choice(slots, n, replace=False))
                objs = []
                for c, a in zip(cols, starts):
                    vis = np.arange(T) >= a
                    objs.append(self._obj(c, SHAPES[int(rng.integers(3))], visible=vis))
                if not self._separated(objs, range(T)):
                    continue
                rng.shuffle(objs)
                answer = cols[0]
                question = "which colour appears first ?"
                options = self._options(answer, cols[1:], COLOR_NAMES)
                meta = dict(frames=[int(starts[0])])
            elif qt == "start_end":
                moment = int(rng.integers(2))
                q = int(rng.integers(4))
                n = int(rng.integers(1, 4))
                cols = self._colors(n)
                other = int(rng.choice([k for k in range(4) if k != q]))
                here, there = self._point_in(q), self._point_in(other)
                objs = [self._obj(cols[0], SHAPES[int(rng.integers(3))],
                                  *((here, there) if moment == 0 else (there, here)))]
                objs += [self._obj(c, SHAPES[int(rng.integers(3))]) for c in cols[1:]]
                if not self._separated(objs, ends):
                    continue
                question = f"where is the {cols[0]} shape at the {MOMENTS[moment]} ?"
                answer = QUADRANTS[q]
                options = list(QUADRANTS)
                meta = dict(frames=[ends[moment]])
            elif qt == "count":
                k = count_k
                shape = SHAPES[int(rng.integers(3))]
                extra = int(rng.integers(0 if k else 1, min(3, 6 - k) if k < 3 else 2))
                cols = self._colors(k + extra)
                shapes = [shape] * k + [SHAPES[(SHAPES.index(shape) + 1 + int(rng.integers(2))) % 3] for _ in range(extra)]
                objs = [self._obj(c, s) for c, s in zip(cols, shapes)]
                if not self._separated(objs, ends):
                    continue
                rng.shuffle(objs)
                question = f"how many {shape}s are there ?"
                answer = NUMBERS[k]
                options = list(NUMBERS)
                meta = dict(frames=list(range(T)))
            elif qt == "brief_color":
                n = int(rng.integers(1, 4))
                cols = self._colors(n + 1)
                length = int(rng.integers(1, 3))
                a = int(rng.integers(0, T - length + 1))
                vis = (np.arange(T) >= a) & (np.arange(T) < a + length)
                p = self._point()
                cross = self._obj(cols[0], "cross", p, p, visible=vis)
                objs = [cross] + [self._obj(c, SHAPES[int(rng.integers(3))]) for c in cols[1:]]
                if not self._separated(objs, range(a, a + length)) or not self._separated(objs[1:], ends):
                    continue
                rng.shuffle(objs)
                question = "what colour is the cross ?"
                answer = cols[0]
                options = self._options(answer, cols[1:], COLOR_NAMES)
                meta = dict(frames=list(range(a, a + length)))
            else:  # pragma: no cover - checked above
                raise AssertionError(qt)
            meta["qtype"] = qt
            return dict(qtype=qt, question=question, options=options, answer=answer, objects=objs,
                        clutter=int(rng.integers(2 ** 31)), meta=meta)
        raise RuntimeError(f"could not sample an unambiguous {qt} scene")

    # -- rendering -----------------------------------------------------------------------------
    def _shape_mask(self, shape, cx, cy):
        r, dx, dy = self.r, self.xx - cx, self.yy - cy
        if shape == "circle":
            return dx * dx + dy * dy <= r * r
        if shape == "square":
            return (np.abs(dx) <= r * 0.8) & (np.abs(dy) <= r * 0.8)
        if shape == "triangle":
            return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.55)
        if shape == "cross":
            arm = r * 0.35
            return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
        raise ValueError(shape)

    def background(self, seed: int) -> np.ndarray:
        """static achromatic clutter: grey rectangles and bars over a noisy dark field"""
        rng = np.random.default_rng(seed)
        S = self.S
        bg = rng.integers(28, 44, size=(S, S)).astype(np.float32)
        for _ in range(int(rng.integers(10, 18))):
            w, h = rng.integers(2, 12, size=2)
            if rng.random() < 0.3:  # thin bar
                w, h = (w, 2) if rng.random() < 0.5 else (2, h)
            x, y = rng.integers(0, S - 1, size=2)
            bg[y:y + h, x:x + w] = rng.integers(45, 120)
        return np.repeat(bg[..., None], 3, axis=2).astype(np.uint8)

    def render(self, sample: dict, with_labels: bool = False):
        """(T, S, S, 3) uint8 frames; with_labels also returns per-pixel (colour, shape) class maps"""
        T, S = self.T, self.S
        bg = self.background(sample["clutter"])
        video = np.repeat(bg[None], T, axis=0)
        if with_labels:
            col = np.zeros((T, S, S), np.int64)
            shp = np.zeros((T, S, S), np.int64)
        for t in range(T):
            for o in sample["objects"]:
                if not o["vis"][t]:
                    continue
                m = self._shape_mask(o["shape"], *o["pos"][t])
                video[t][m] = COLORS[o["color"]]
                if with_labels:
                    col[t][m] = COLOR_CLASSES.index(o["color"])
                    shp[t][m] = SHAPE_CLASSES.index(o["shape"])
        return (video, col, shp) if with_labels else video


def patch_labels(label_map: np.ndarray, patch: int, min_pixels: int = 10) -> np.ndarray:
    """(T, S, S) class map -> (T, S/p * S/p) majority non-background class per patch
    (background when fewer than min_pixels object pixels fall in the patch)"""
    T, S, _ = label_map.shape
    g = S // patch
    blocks = label_map.reshape(T, g, patch, g, patch).transpose(0, 1, 3, 2, 4).reshape(T, g * g, patch * patch)
    k = int(label_map.max()) + 1
    counts = np.stack([(blocks == c).sum(-1) for c in range(1, max(k, 2))], -1)  # (T, g*g, k-1)
    best = counts.argmax(-1) + 1
    return np.where(counts.max(-1) >= min_pixels, best, 0)


def write_video(path, frames: np.ndarray, fps: int = 4) -> None:
    """lossless MP4 (libx264rgb, crf 0): both decord and PyAV read back the exact pixels"""
    import av
    T, H, W, _ = frames.shape
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "rgb24"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_dataset(out_dir, num: int, seed: int = 12345, frames: int = 8, qtypes=QTYPES, size: int = 64,
                  name: str = "synthetic") -> Path:
    """Render `num` samples (question types in turn) to out_dir/videos/*.mp4 and out_dir/<name>.jsonl.
    Returns the JSONL path. Deterministic in (seed, frames, qtypes, size)."""
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    gen = VideoQAGenerator(frames=frames, size=size, seed=seed, qtypes=qtypes)
    path = out / f"{name}.jsonl"
    with open(path, "w") as f:
        for i in range(num):
            s = gen.sample(qtypes[i % len(qtypes)])
            vid = out / "videos" / f"{name}_{i:05d}.mp4"
            write_video(vid, gen.render(s))
            rec = dict(id=f"{name}-{i:05d}", video=os.path.relpath(vid, out), question=s["question"],
                       options=s["options"], answer=s["options"].index(s["answer"]), meta=s["meta"])
            f.write(json.dumps(rec) + "\n")
    return path
