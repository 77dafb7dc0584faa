"""COCO compressed RLE of a mask, as written into result files and `datasets` rows.

The runs come from the processor's own encoder (`processing_gsva.mask_to_rle`, the one RLE encoder: the Hub files
cannot import this package); pycocotools only packs them into COCO's compressed `counts` string, so this string
and the processor's uncompressed `counts` always describe the same pixels.
"""

import numpy as np
import torch

from processing_gsva import mask_to_rle


def compressed_rle(mask) -> dict:
    """`{"size": [height, width], "counts": str}` of a 2-D mask (numpy array or tensor; non-zero is inside):
    the string pycocotools' `encode` gives, readable by its `decode`."""
    from pycocotools import mask as coco_mask

    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    runs = mask_to_rle(mask)
    height, width = runs["size"]
    packed = coco_mask.frPyObjects(runs, height, width)
    return {"size": [int(height), int(width)], "counts": packed["counts"].decode("ascii")}


__all__ = ["compressed_rle"]
