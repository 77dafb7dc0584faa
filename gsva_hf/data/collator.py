"""Batch `Sample`s into `GSVAForCausalLM` inputs: processor outputs plus per-row ground-truth masks."""

import numpy as np
import torch

from .sample import Sample


class GSVACollator:
    """`processor(images, conversations)` (right-padded with labels when every conversation has answers) plus
    `gt_masks`: one float tensor `[K, H, W]` per row at that image's original size, so images of any size and any
    number of targets batch together.

    return_samples: also return the `Sample`s under "samples" (for evaluation logs); pop it before `forward`.
    max_length: passed to the processor, which raises (never truncates) on longer rows.
    """

    def __init__(self, processor, return_samples: bool = False, max_length: int | None = None):
        self.processor = processor
        self.return_samples = return_samples
        self.max_length = max_length

    def __call__(self, samples: list[Sample]):
        if not samples:
            raise ValueError("GSVACollator got an empty batch")
        for row, sample in enumerate(samples):
            if not isinstance(sample, Sample):
                raise TypeError(f"batch item {row} is a {type(sample).__name__}, not a Sample")
        batch = self.processor(
            images=[sample.image for sample in samples],
            conversations=[sample.rounds for sample in samples],
            max_length=self.max_length,
        )
        slot_ids = torch.tensor(
            [self.processor.token_ids["seg_token_id"], self.processor.token_ids["rej_token_id"]]
        )
        slots = torch.isin(batch["input_ids"], slot_ids).sum(dim=1)
        for row, sample in enumerate(samples):
            if int(slots[row]) != sample.masks.shape[0]:
                raise ValueError(
                    f"batch row {row} ({sample.source or 'sample'}, {sample.image_path or 'no path'}): the text has "
                    f"{int(slots[row])} [SEG]/[REJ] tokens but the sample has {sample.masks.shape[0]} masks"
                )
        batch["gt_masks"] = [
            torch.from_numpy(np.ascontiguousarray(sample.masks, dtype=np.float32)) for sample in samples
        ]
        if self.return_samples:
            batch["samples"] = list(samples)
        return batch


__all__ = ["GSVACollator"]
