"""The one way dataset images are read: pixels as stored, checked against what the annotations claim.

Annotations (COCO polygons and RLEs, label maps, labelme polygons) are coordinates on the pixels as stored in the
file; an EXIF orientation tag is not applied to them. So dataset images are decoded without EXIF rotation and
leave the reader with no metadata, so that no later loader (the processor's `load_image`, which rotates user
photos upright) turns the pixels away from their masks. Images given for inference keep EXIF rotation.
"""

import warnings

from PIL import Image

from processing_gsva import MAX_IMAGE_MEGAPIXELS, load_image


def as_stored(image: Image.Image) -> Image.Image:
    """`image` with no metadata left (EXIF/XMP orientation included), so its pixels are used exactly as they are."""
    if not image.info and getattr(image, "_exif", None) is None:
        return image
    image = image.copy()
    image.info.clear()
    return image


def open_dataset_image(source, name: str | None = None) -> Image.Image:
    """An RGB dataset image (a path or a binary file object) with the pixels as stored; `load_image`'s decoding,
    bit depths and size limits, without EXIF rotation. Every problem, a missing file included, is a ValueError
    naming the file."""
    return as_stored(load_image(source, name=name, exif_transpose=False))


def image_header_size(source, name: str | None = None) -> tuple[int, int]:
    """(height, width) read from the image file's header without decoding its pixels."""
    name = name or str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as opened:
                width, height = opened.size
    except Image.DecompressionBombError as error:
        raise ValueError(f"image {name!r} is too large ({error})") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read the header of image file {name!r}: {error}") from error
    finally:
        if hasattr(source, "seek"):
            source.seek(0)
    return height, width


def check_claimed_size(claimed: tuple[int, int], source=None, name: str | None = None, claimed_by: str = "the annotation") -> None:
    """Refuse a claimed (height, width) over `load_image`'s pixel limit or, given the image `source`, unlike what
    its file header says; called before any mask (or label map) of that image is decoded."""
    height, width = claimed
    if height * width > MAX_IMAGE_MEGAPIXELS * 1_000_000:
        raise ValueError(
            f"{claimed_by} says {height}x{width} ({height * width / 1e6:.1f} megapixels), over the limit of "
            f"{MAX_IMAGE_MEGAPIXELS} megapixels; no mask of it is decoded"
        )
    if source is None:
        return
    actual = image_header_size(source, name)
    if actual != (height, width):
        raise ValueError(
            f"{name or str(source)} is {actual[0]}x{actual[1]} but {claimed_by} says {height}x{width}; no mask of it "
            "is decoded"
        )


__all__ = ["as_stored", "check_claimed_size", "image_header_size", "open_dataset_image"]
