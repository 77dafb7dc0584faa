"""Checks on untrusted annotation files, run when a reader builds its index.

Annotation files are downloaded data: one bad number can make pycocotools allocate without bound (it walks the
polygon outline pixel by pixel, so a coordinate of 1e30 or NaN never finishes), garbage RLE strings decode into
nonsense or read past their end, and a `file_name` of `../../etc/passwd` opens a file outside the data tree.
These helpers refuse such entries up front; callers add the file and the entry to the message.
"""

import math
import os

import numpy as np

# Real COCO polygons sit on the image border and sometimes a fraction of a pixel beyond it. Coordinates up to this
# far outside are kept exactly as stored (pycocotools clips the rasterised mask to the image, as GSVA decodes it);
# anything farther is refused rather than guessed at.
POLYGON_MARGIN = 4.0
# A COCO RLE count is a uint32; a compressed number longer than this many 5-bit characters cannot be one.
_MAX_RLE_CHARS_PER_COUNT = 7


class AnnotationError(ValueError):
    """One annotation entry is unusable; the message says what is wrong (the caller names the file and entry)."""


def check_polygon(polygon, height: int, width: int) -> None:
    """Refuse a flat `[x1, y1, x2, y2, ...]` polygon with a non-finite coordinate, a coordinate more than
    `POLYGON_MARGIN` pixels outside the image, or no point of its bounding box inside the image."""
    xs, ys = polygon[0::2], polygon[1::2]
    for axis, values, limit in (("x", xs, width), ("y", ys, height)):
        for value in values:
            if isinstance(value, float) and not math.isfinite(value):
                raise AnnotationError(f"polygon has a non-finite {axis} coordinate {value!r}")
            if value < -POLYGON_MARGIN or value > limit + POLYGON_MARGIN:
                raise AnnotationError(
                    f"polygon {axis} coordinate {value!r:.24} lies outside the image (0..{limit}, {POLYGON_MARGIN:g} "
                    "pixels of overshoot are accepted)"
                )
    if max(xs) <= 0 or min(xs) >= width or max(ys) <= 0 or min(ys) >= height:
        raise AnnotationError(
            f"polygon lies wholly outside the {height}x{width} image (x {min(xs)}..{max(xs)}, "
            f"y {min(ys)}..{max(ys)}); it would silently become an empty ([REJ]) target"
        )


def compressed_rle_counts(counts: bytes) -> np.ndarray:
    """The run lengths of a COCO compressed RLE string (pycocotools' `rleFrString` format), refusing malformed
    strings: characters outside '0'..'o', a string that ends inside a number, numbers too long for a count,
    negative runs."""
    codes = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if codes.size == 0:
        raise AnnotationError("compressed RLE 'counts' is empty")
    if codes.min() < 0 or codes.max() > 63:
        bad = int(np.flatnonzero((codes < 0) | (codes > 63))[0])
        raise AnnotationError(
            f"compressed RLE 'counts' has character {chr(counts[bad])!r} at position {bad}; only '0'..'o' occur"
        )
    more = (codes & 0x20) != 0
    if more[-1]:
        raise AnnotationError("compressed RLE 'counts' ends in the middle of a number")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _MAX_RLE_CHARS_PER_COUNT:
        raise AnnotationError(
            f"compressed RLE 'counts' holds a number of {int(lengths.max())} characters; a run length has at most "
            f"{_MAX_RLE_CHARS_PER_COUNT}"
        )
    group = np.repeat(np.arange(ends.size), lengths)
    position = np.arange(codes.size) - starts[group]
    values = np.zeros(ends.size, dtype=np.int64)
    np.add.at(values, group, (codes & 0x1F) << (5 * position))
    negative = (codes[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])
    # From the fourth number on, each is stored as the difference to the run two places earlier.
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    if runs.min() < 0:
        raise AnnotationError(f"compressed RLE 'counts' decodes to a negative run ({int(runs.min())})")
    return runs


def check_rle_counts(counts, height: int, width: int) -> None:
    """Refuse RLE counts (a list, or a compressed `bytes` string) whose runs are not non-negative and summing to
    height x width, which is what decoding them into a mask needs."""
    if isinstance(counts, bytes):
        runs = compressed_rle_counts(counts)
        total = int(runs.sum())
    else:
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise AnnotationError("uncompressed RLE counts must be non-negative ints")
        total = sum(counts)
    if total != height * width:
        raise AnnotationError(f"RLE runs sum to {total} pixels, but the {height}x{width} image has {height * width}")


def safe_join(root, name: str) -> str:
    """`root/name` for a relative `name` that stays inside `root`; absolute names and `..` parts are refused
    (symbolic links inside `root` are followed as usual: a data tree may link its image folder elsewhere)."""
    if not isinstance(name, str) or not name:
        raise AnnotationError(f"file name {name!r} must be a non-empty string")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or os.path.splitdrive(name)[0] or ".." in parts:
        raise AnnotationError(
            f"file name {name!r} points outside the data folder {os.fspath(root)!r}; only relative names without "
            "'..' are opened"
        )
    return os.path.join(os.fspath(root), name)


__all__ = [
    "POLYGON_MARGIN",
    "AnnotationError",
    "check_polygon",
    "check_rle_counts",
    "compressed_rle_counts",
    "safe_join",
]
