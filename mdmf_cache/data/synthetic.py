"""Synthetic videos for tests, the demo and benchmarks (written with PyAV).

Two kinds of content:

* *index videos*: every frame shows its own frame index as a binary code of big black/white
  blocks, so a decoded frame can be checked against the index that was asked for
  (:func:`write_index_video`, :func:`write_index_frames`, :func:`decode_index`);
* a tiny *action dataset*: one class per coloured shape moving in one direction
  (:func:`make_action_dataset`).

The AVI files use MPEG-4 Part 2 with B-frames and keyframes mid-video, like the xvid files of
UCF101/HMDB51, because that is where frame-accurate seeking goes wrong in some decoders.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: Number of bits in the index code: frames 0..4095 can be labelled.
INDEX_BITS = 12

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (235, 220, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}


# --------------------------------------------------------------------------------------------
# Encoding helpers
# --------------------------------------------------------------------------------------------


def _codec_for(path: Path) -> str:
    """Pick the encoder for a container from the file extension.

    Args:
        path: Output file; its suffix selects the container.

    Returns:
        The PyAV encoder name.

    Raises:
        ValueError: For an extension this module does not write.
    """
    import av

    available = av.codecs_available
    ext = path.suffix.lower()
    if ext == ".avi":
        # MPEG-4 Part 2 is what the xvid files of UCF101/HMDB51 contain.
        return "mpeg4"
    if ext in (".mp4", ".mkv", ".mov"):
        return "libx264" if "libx264" in available else "mpeg4"
    if ext == ".webm":
        for name in ("libvpx-vp9", "libvpx"):
            if name in available:
                return name
        raise ValueError(f"no VP8/VP9 encoder in this PyAV build, cannot write {path}")
    raise ValueError(f"unsupported extension {ext!r} for {path} (use .avi, .mp4, .mkv, .mov, .webm)")


def _open_writer(path: Path, size: tuple[int, int], fps: int, bframes: bool, gop: int):
    """Open an output container with one configured video stream.

    Args:
        path: Output file.
        size: (width, height); both must be even for yuv420p.
        fps: Frame rate.
        bframes: Allow up to 2 consecutive B-frames.
        gop: Keyframe interval in frames.

    Returns:
        (container, stream) ready for ``stream.encode``.
    """
    import av

    width, height = size
    if width % 2 or height % 2:
        raise ValueError(f"size must be even for yuv420p, got {size}")
    codec = _codec_for(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    container = av.open(str(path), mode="w")
    options: dict[str, str] = {}
    if codec == "libx264":
        # "ultrafast" would disable B-frames; "veryfast" keeps them and is still quick.
        options = {"preset": "veryfast", "crf": "18", "bf": "2" if bframes else "0"}
        options["sc_threshold"] = "0"  # keyframes exactly every `gop` frames
    elif codec in ("libvpx", "libvpx-vp9"):
        options = {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "0"}
    stream = container.add_stream(codec, rate=fps, options=options)
    stream.width = width
    stream.height = height
    stream.pix_fmt = "yuv420p"
    ctx = stream.codec_context
    ctx.time_base = Fraction(1, fps)
    ctx.gop_size = gop
    ctx.thread_count = 1
    if codec == "mpeg4":
        ctx.max_b_frames = 2 if bframes else 0
        # High bit rate keeps the index blocks crisp; the files are tiny anyway.
        ctx.bit_rate = 4_000_000
    return container, stream


def _encode(path: Path, frames, size: tuple[int, int], fps: int, bframes: bool,
            gop: int) -> None:
    """Encode an iterable of RGB uint8 (H, W, 3) frames into ``path`` in this process."""
    import av

    container, stream = _open_writer(path, size, fps, bframes, gop)
    try:
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush delayed (B-frame) packets
            container.mux(packet)
    finally:
        container.close()


def _encode_in_subprocess(path: Path, frames: np.ndarray, size: tuple[int, int], fps: int,
                          bframes: bool, gop: int) -> None:
    """Encode in a fresh interpreter that loads PyAV's FFmpeg only (no decord)."""
    with tempfile.TemporaryDirectory() as tmp:
        npy = Path(tmp) / "frames.npy"
        np.save(npy, frames)
        args = json.dumps([str(path), str(npy), list(size), fps, bframes, gop])
        code = ("import json, sys, numpy as np\n"
                "from mdmf_cache.data.synthetic import _encode\n"
                "p, f, size, fps, bf, gop = json.loads(sys.argv[1])\n"
                "from pathlib import Path\n"
                "_encode(Path(p), np.load(f), tuple(size), fps, bf, gop)\n")
        env = dict(os.environ)
        pkg_parent = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_parent, env.get("PYTHONPATH")]))
        proc = subprocess.run([sys.executable, "-c", code, args], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " ".join(proc.stderr.strip().splitlines()[-1:])
            raise RuntimeError(f"encoding {path} in a subprocess failed: {tail}")


def _write_frames(path: Path, frames, size: tuple[int, int], fps: int, bframes: bool,
                  gop: int) -> None:
    """Encode RGB uint8 (H, W, 3) frames into ``path``.

    decord bundles its own libvpx; once decord is loaded before PyAV, PyAV's libvpx encoders
    fail to open (PyAV 18 + decord 0.6). WebM files are then written from a subprocess.
    """
    import av

    codec = _codec_for(path)
    if codec not in ("libvpx", "libvpx-vp9"):
        _encode(path, frames, size, fps, bframes, gop)
        return
    frames = np.stack(list(frames))
    try:
        _encode(path, frames, size, fps, bframes, gop)
    except av.FFmpegError as e:
        if "decord" not in sys.modules:
            raise
        logger.info("%s: %s failed in-process (%s); decord's libvpx is loaded, encoding in a "
                    "subprocess", path, codec, e)
        path.unlink(missing_ok=True)
        _encode_in_subprocess(path, frames, size, fps, bframes, gop)


# --------------------------------------------------------------------------------------------
# Index-coded frames
# --------------------------------------------------------------------------------------------


def index_frame(index: int, size: tuple[int, int] = (192, 96)) -> np.ndarray:
    """Draw one frame whose pixels encode ``index``.

    The top half holds ``INDEX_BITS`` columns (most significant bit first), white for 1 and black
    for 0; the bottom half holds the complement, so decoding compares the two halves instead of
    relying on an absolute threshold that compression could shift.

    Args:
        index: Frame index, 0 <= index < 2**INDEX_BITS.
        size: (width, height); width must be at least INDEX_BITS * 8.

    Returns:
        RGB uint8 array of shape (height, width, 3).
    """
    width, height = size
    if not 0 <= index < 2**INDEX_BITS:
        raise ValueError(f"index {index} does not fit in {INDEX_BITS} bits")
    if width < INDEX_BITS * 8 or height < 16:
        raise ValueError(f"size {size} too small for a {INDEX_BITS}-bit index code")
    bits = [(index >> (INDEX_BITS - 1 - b)) & 1 for b in range(INDEX_BITS)]
    frame = np.full((height, width, 3), 128, dtype=np.uint8)
    block = width // INDEX_BITS
    half = height // 2
    for b, bit in enumerate(bits):
        cols = slice(b * block, (b + 1) * block)
        frame[:half, cols] = 255 if bit else 0
        frame[half:2 * half, cols] = 0 if bit else 255
    return frame


def decode_index(frame: np.ndarray) -> int:
    """Recover the index drawn by :func:`index_frame` from a decoded (possibly lossy) frame.

    Args:
        frame: RGB uint8 array (H, W, 3) as returned by a decoder.

    Returns:
        The encoded frame index.

    Raises:
        ValueError: If a block is ambiguous (the frame is not an index frame or badly damaged).
    """
    height, width = frame.shape[:2]
    gray = frame.astype(np.float32).mean(axis=2)
    block = width // INDEX_BITS
    half = height // 2
    # Sample block centres only: edges bleed into neighbours after lossy compression.
    mx, my = block // 4, half // 4
    value = 0
    for b in range(INDEX_BITS):
        x0, x1 = b * block + mx, (b + 1) * block - mx
        top = gray[my:half - my, x0:x1].mean()
        bottom = gray[half + my:2 * half - my, x0:x1].mean()
        if abs(top - bottom) < 64:
            raise ValueError(f"bit {b} is ambiguous (top {top:.0f}, bottom {bottom:.0f})")
        value = (value << 1) | int(top > bottom)
    return value


def write_index_video(path: str | Path, num_frames: int, size: tuple[int, int] = (192, 96),
                      fps: int = 25, bframes: bool = True, gop: int = 12) -> Path:
    """Write a video whose frame ``i`` shows the index code of ``i``.

    Codec per extension: ``.avi`` MPEG-4 Part 2 (``mpeg4``, B-frames when ``bframes``),
    ``.mp4``/``.mkv`` H.264 (``libx264``, else ``mpeg4``), ``.webm`` VP9 (``libvpx-vp9``, else
    VP8). Keyframes every ``gop`` frames so that seeks land mid-video.

    Args:
        path: Output file.
        num_frames: Number of frames to write.
        size: (width, height), even numbers.
        fps: Frame rate.
        bframes: Allow B-frames (up to 2 in a row).
        gop: Keyframe interval.

    Returns:
        The output path.
    """
    path = Path(path)
    _write_frames(path, (index_frame(i, size) for i in range(num_frames)), size, fps,
                  bframes, gop)
    return path


def make_stamped_tree(root: str | Path, classes: Sequence[str], videos_per_class: int,
                      formats: Sequence[str] = (".mp4", ".avi", ".mov"), min_frames: int = 10,
                      size: tuple[int, int] = (96, 32), stride: int = 64) -> dict[str, tuple[int, int]]:
    """Write ``root/<class>/<class>_vNN.<ext>`` where every video is told apart by its frames.

    Video number ``k`` (counting over classes, then videos) has ``min_frames + k`` frames and its
    frame ``t`` shows the index code ``k * stride + t``: no two videos share a frame or a length,
    so a cache row holding another video's frames shows it.

    Returns:
        ``class/video`` id -> (k * stride, number of frames).
    """
    root = Path(root)
    out = {}
    k = 0
    for cls in classes:
        for j in range(videos_per_class):
            n = min_frames + k
            if n > stride or (k + 1) * stride > 2**INDEX_BITS:
                raise ValueError(f"video {k}: {n} frames do not fit the code range")
            stem = f"{cls}_v{j:02d}"
            path = root / cls / f"{stem}{formats[k % len(formats)]}"
            _write_frames(path, (index_frame(k * stride + t, size) for t in range(n)), size, 25,
                          bframes=True, gop=12)
            out[f"{cls}/{stem}"] = (k * stride, n)
            k += 1
    return out


def write_index_frames(folder: str | Path, num_frames: int, size: tuple[int, int] = (192, 96),
                       quality: int = 95) -> Path:
    """Write a folder of JPEG frames ``img_00001.jpg ...`` (the released code's layout).

    Args:
        folder: Output directory (created).
        num_frames: Number of frames.
        size: (width, height).
        quality: JPEG quality.

    Returns:
        The folder path.
    """
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(num_frames):
        Image.fromarray(index_frame(i, size)).save(folder / f"img_{i + 1:05d}.jpg",
                                                   quality=quality)
    return folder


def frame_types(path: str | Path) -> list[str]:
    """Picture types (``I``/``P``/``B``) of all frames, in presentation order.

    Used to check that a synthetic file really has B-frames and mid-video keyframes.

    Args:
        path: Video file.

    Returns:
        One letter per decoded frame.
    """
    import av
    from av.video.frame import PictureType

    with av.open(str(path)) as container:
        # PyAV versions differ: pict_type is an enum member or a plain int.
        return [PictureType(int(frame.pict_type)).name for frame in container.decode(video=0)]


# --------------------------------------------------------------------------------------------
# Corrupt files
# --------------------------------------------------------------------------------------------


def truncate_file(path: str | Path, keep_fraction: float) -> Path:
    """Cut a file in place to its first ``keep_fraction`` of bytes (a download that broke off).

    Args:
        path: File to truncate.
        keep_fraction: Fraction of bytes to keep, in [0, 1].

    Returns:
        The path.
    """
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    path = Path(path)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep_fraction))
    return path


def write_empty_file(path: str | Path) -> Path:
    """Create a zero-byte file (parents created).

    Args:
        path: File to create.

    Returns:
        The path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


# --------------------------------------------------------------------------------------------
# Action dataset
# --------------------------------------------------------------------------------------------


def all_action_classes() -> list[str]:
    """Every class this module can render, as directory names, in a fixed mixed order.

    The order is a fixed permutation of colours x shapes x directions, so any prefix mixes
    colours, shapes and directions (useful for class-disjoint splits of a few classes).

    Returns:
        48 names such as ``red_circle_moving_left``.
    """
    names = [f"{c}_{s}_moving_{d}" for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS)]
    order = np.random.default_rng(12345).permutation(len(names))
    return [names[i] for i in order]


def _parse_class(name: str) -> tuple[str, str, str]:
    """Split ``red_circle_moving_left`` or ``a red circle moving left`` into its parts."""
    words = name.replace("_", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    direction = next((w for w in words if w in DIRECTIONS), None)
    if colour is None or shape is None or direction is None:
        raise ValueError(
            f"cannot render class {name!r}: need a colour {list(COLOURS)}, a shape "
            f"{list(SHAPES)} and a direction {list(DIRECTIONS)}")
    return colour, shape, direction


def _render_action(colour: str, shape: str, direction: str, num_frames: int,
                   size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Render one video of a shape moving across a noisy background.

    Returns:
        uint8 array (num_frames, H, W, 3).
    """
    width, height = size
    radius = max(3, int(min(width, height) * rng.uniform(0.14, 0.22)))
    dx, dy = DIRECTIONS[direction]
    # Start near the side opposite to the motion so the shape crosses the frame.
    travel_x = width - 2 * radius
    travel_y = height - 2 * radius
    speed = rng.uniform(0.6, 1.0)
    cx0 = radius + (travel_x * (0.5 - 0.5 * dx * speed) if dx else rng.uniform(0, travel_x))
    cy0 = radius + (travel_y * (0.5 - 0.5 * dy * speed) if dy else rng.uniform(0, travel_y))
    steps = np.linspace(0.0, 1.0, num_frames)
    cx = cx0 + dx * speed * travel_x * steps
    cy = cy0 + dy * speed * travel_y * steps

    bg = rng.integers(0, 90, size=3)
    noise_level = int(rng.integers(2, 20))
    yy, xx = np.mgrid[0:height, 0:width]
    colour_arr = np.array(COLOURS[colour], dtype=np.uint8)
    video = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    noise = rng.integers(0, noise_level + 1, size=(num_frames, height, width, 1), dtype=np.uint8)
    video[:] = bg.astype(np.uint8)
    video += noise
    for t in range(num_frames):
        ox, oy = xx - cx[t], yy - cy[t]
        if shape == "circle":
            mask = ox * ox + oy * oy <= radius * radius
        elif shape == "square":
            mask = (np.abs(ox) <= radius * 0.85) & (np.abs(oy) <= radius * 0.85)
        else:  # triangle pointing up
            mask = (oy >= -radius) & (oy <= radius) & (np.abs(ox) <= (oy + radius) / 2)
        video[t][mask] = colour_arr
    return video


def make_action_dataset(root: str | Path, classes: Sequence[str] | None = None,
                        videos_per_class: int = 4, num_frames: int = 32,
                        size: tuple[int, int] = (96, 72), seed: int = 0,
                        formats: Sequence[str] = (".mp4", ".avi"), num_classes: int = 24,
                        fps: int = 25) -> list[str]:
    """Write a tiny action dataset ``root/<class>/<class>_vNN.<ext>`` of real encoded videos.

    Each class is a coloured shape moving in one direction (``red_circle_moving_left``); videos
    of a class differ in start position, speed, shape size, background colour and noise (drawn
    from ``seed``). Video ``j`` of a class uses ``formats[j % len(formats)]``, so with the
    default every class has both MP4 (H.264) and AVI (MPEG-4 with B-frames) files.

    Args:
        root: Output directory.
        classes: Class names (underscored or spaced words); ``None`` takes the first
            ``num_classes`` of :func:`all_action_classes`.
        videos_per_class: Videos per class.
        num_frames: Frames per video.
        size: (width, height), even numbers.
        seed: Seed for all random variation.
        formats: File extensions to cycle through.
        num_classes: Number of classes when ``classes`` is None (at most 48).
        fps: Frame rate.

    Returns:
        The class directory names, in the order written.
    """
    root = Path(root)
    if classes is None:
        available = all_action_classes()
        if not 1 <= num_classes <= len(available):
            raise ValueError(f"num_classes must be in 1..{len(available)}, got {num_classes}")
        classes = available[:num_classes]
    parsed = [_parse_class(c) for c in classes]
    dir_names = [f"{c}_{s}_moving_{d}" for c, s, d in parsed]
    if len(set(dir_names)) != len(dir_names):
        raise ValueError(f"duplicate classes in {list(classes)}")
    rng = np.random.default_rng(seed)
    for (colour, shape, direction), dir_name in zip(parsed, dir_names):
        for j in range(videos_per_class):
            ext = formats[j % len(formats)]
            video = _render_action(colour, shape, direction, num_frames, size, rng)
            path = root / dir_name / f"{dir_name}_v{j:02d}{ext}"
            _write_frames(path, video, size, fps, bframes=True, gop=12)
    logger.info("wrote %d synthetic videos in %d classes under %s",
                len(dir_names) * videos_per_class, len(dir_names), root)
    return dir_names
