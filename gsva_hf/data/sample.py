"""The one record every dataset reader produces and the collator consumes."""

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .images import as_stored


@dataclass
class Sample:
    """One image with its conversation and one ground-truth mask per `[SEG]`/`[REJ]` slot.

    image: RGB PIL image, its pixels as stored in the file (the annotations' frame); any metadata is dropped here,
        so that no later loader applies an EXIF rotation to the pixels without the masks.
    rounds: (question, answer) pairs; questions carry no image placeholder (the processor puts the image first).
        Answers hold `[SEG]`/`[REJ]` in the order of `masks`; the readers build them as `AnswerText`, whose typed
        text (sentences, class names, explanations) never becomes a slot even when it contains "[SEG]".
    masks: bool array `[K, H, W]` at the image's size, K = number of `[SEG]`/`[REJ]` in the answers
        (all-zero for `[REJ]` slots); `K = 0` for text-only samples.
    targets / rejected: the phrase and the `[REJ]` flag of each slot.
    meta: identifiers of the sample in its source (e.g. dataset, split, image_id, per-slot ref_ids and sent_ids),
        so evaluation logs and per-sample results can name what was scored.
    """

    image: Image.Image
    rounds: list[tuple[str, str | None]]
    masks: np.ndarray
    targets: list[str] = field(default_factory=list)
    rejected: list[bool] = field(default_factory=list)
    image_path: str = ""
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.image = as_stored(self.image)
        height, width = self.image.height, self.image.width
        if self.masks.ndim != 3 or self.masks.shape[1:] != (height, width):
            raise ValueError(
                f"{self.source or 'sample'} ({self.image_path}): masks of shape {self.masks.shape} do not match "
                f"the image size {(height, width)}"
            )
        if len(self.targets) != self.masks.shape[0] or len(self.rejected) != self.masks.shape[0]:
            raise ValueError(
                f"{self.source or 'sample'} ({self.image_path}): {self.masks.shape[0]} masks but "
                f"{len(self.targets)} targets and {len(self.rejected)} rejected flags"
            )
