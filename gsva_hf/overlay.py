"""Overlays: each present target tinted and outlined in a colour picked against the image, with a legend.

The one drawing of a segmentation result, shared by `gsva-segment` (overlay.png) and the demo page.
"""

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REJECTED_COLOUR = (150, 150, 150)
TINT = 0.5  # weight of the target colour over the image inside a mask
MIN_DISPLAY_SIDE = 512  # small images are upscaled (nearest neighbour) to at least this long side
OUTLINE_WIDTH = 2  # pixels at display scale


def srgb_to_lab(rgb) -> np.ndarray:
    """CIELAB (D65) of sRGB colours in 0..255, shape (..., 3)."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _candidate_colours() -> np.ndarray:
    """Saturated, light and dark versions of 24 hues, plus black and white."""
    colours = [(0, 0, 0), (255, 255, 255)]
    for hue in range(0, 360, 15):
        for saturation, value in ((1.0, 1.0), (0.55, 1.0), (1.0, 0.55)):
            chroma = value * saturation
            x = chroma * (1 - abs((hue / 60) % 2 - 1))
            r, g, b = [(chroma, x, 0), (x, chroma, 0), (0, chroma, x), (0, x, chroma), (x, 0, chroma), (chroma, 0, x)][hue // 60]
            m = value - chroma
            colours.append(tuple(round(255 * (v + m)) for v in (r, g, b)))
    return np.array(colours, np.float64)


CANDIDATES = _candidate_colours()
CANDIDATES_LAB = srgb_to_lab(CANDIDATES)


def image_colours(image: Image.Image, cell: float = 20.0, share: float = 0.002) -> np.ndarray:
    """CIELAB of the colours the image shows: means of the `cell`-wide Lab bins holding at least `share` of a
    thumbnail's pixels (a small object of its own colour counts, unlike in a few-colour palette)."""
    small = image.convert("RGB")
    small.thumbnail((128, 128))
    lab = srgb_to_lab(np.asarray(small).reshape(-1, 3))
    _, bins, counts = np.unique(np.floor(lab / cell), axis=0, return_inverse=True, return_counts=True)
    bins = bins.reshape(-1)
    means = np.stack([np.bincount(bins, weights=lab[:, k]) for k in range(3)], -1) / counts[:, None]
    return means[counts >= share * len(lab)]


def target_colours(image: Image.Image, result) -> list[tuple[int, int, int]]:
    """Per target the candidate colour whose tint (`TINT` over the mean colour under its mask) stands furthest
    apart, by the smallest CIE76 delta-E, from that mean colour, from the image's other colours (a tint never
    looks like another object) and from the colours and tints already taken. Rejected targets are grey."""
    pixels = np.asarray(image.convert("RGB"), np.float64)
    scene, taken, colours = list(image_colours(image)), [], []
    for target in result.targets:
        mask = np.asarray(target.mask, bool)
        if target.rejected:
            colours.append(REJECTED_COLOUR)
            continue
        under = pixels[mask].mean(0) if mask.any() else pixels.reshape(-1, 3).mean(0)
        tint = srgb_to_lab((1 - TINT) * under + TINT * CANDIDATES)
        distance = np.linalg.norm(tint - srgb_to_lab(under), axis=-1)
        for lab in scene:
            distance = np.minimum(distance, np.linalg.norm(tint - lab, axis=-1))
        for lab in taken:
            distance = np.minimum(distance, np.linalg.norm(CANDIDATES_LAB - lab, axis=-1))
        best = int(distance.argmax())
        taken.append(CANDIDATES_LAB[best])
        scene.append(tint[best])  # later tints must not look like this one either
        colours.append(tuple(int(v) for v in CANDIDATES[best]))
    return colours


def mask_border(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Mask pixels within `width` pixels (4-neighbourhood steps) of the mask's edge or the image's edge."""
    inner = mask.copy()
    for _ in range(width):
        padded = np.pad(inner, 1, constant_values=False)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def display_scale(size: tuple[int, int]) -> int:
    """Integer upscale factor that brings the long side to at least `MIN_DISPLAY_SIDE`."""
    return max(1, math.ceil(MIN_DISPLAY_SIDE / max(size)))


def overlay(image: Image.Image, result) -> Image.Image:
    """Each present target tinted and outlined in a colour picked against the image under it; below, a legend
    (font scaled to the picture) lists every phrase with its score, rejected ones as not present."""
    image = image.convert("RGB")
    colours = target_colours(image, result)
    scale = display_scale(image.size)
    base = np.asarray(image, np.float32)
    if scale > 1:
        base = base.repeat(scale, 0).repeat(scale, 1)
    for target, colour in zip(result.targets, colours):
        if target.rejected:
            continue
        mask = np.asarray(target.mask, bool)
        if scale > 1:
            mask = mask.repeat(scale, 0).repeat(scale, 1)
        base[mask] = (1 - TINT) * base[mask] + TINT * np.array(colour, np.float32)
        base[mask_border(mask, OUTLINE_WIDTH)] = colour
    picture = Image.fromarray(base.round().astype(np.uint8))

    font_size = max(14, round(max(picture.size) / 30))
    font = ImageFont.load_default(size=font_size)
    line_height, pad = round(font_size * 1.5), round(font_size * 0.5)
    labels = []
    for index, target in enumerate(result.targets):
        phrase = target.phrase or f"target {index}"
        if target.rejected:
            labels.append(f"{phrase} - not present ({target.score:.2f})")
        else:
            empty = "" if bool(target.mask.any()) else ", empty mask"
            labels.append(f"{phrase} ({target.score:.2f}{empty})")
    if not labels:
        labels, colours = ["no target in the answer"], [None]
    measure = ImageDraw.Draw(picture)
    text_width = max(measure.textlength(label, font=font) for label in labels)
    width = max(picture.width, math.ceil(2 * pad + 1.5 * font_size + text_width))
    canvas = Image.new("RGB", (width, picture.height + line_height * len(labels) + 2 * pad), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for index, (label, colour) in enumerate(zip(labels, colours)):
        top = picture.height + pad + index * line_height
        if colour is not None:
            box = [pad, top + (line_height - font_size) // 2, pad + font_size, top + (line_height + font_size) // 2]
            draw.rectangle(box, fill=colour, outline=(0, 0, 0))
        draw.text((pad + 1.5 * font_size, top + line_height / 2), label, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas
