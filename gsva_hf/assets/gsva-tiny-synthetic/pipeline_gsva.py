"""`pipeline(model=FOLDER_OR_REPO, trust_remote_code=True)`: GSVA as an image-segmentation-style pipeline.

    pipe = pipeline(model="you/gsva-7b", trust_remote_code=True)
    pipe(image, targets=["the man on the left", "the red car"])    # one result per phrase, in order
    pipe(image, text="What are the people in this image?")          # the model's own answer decides the targets

Each result is a dict: `label` (the phrase), `score` (probability of the model's `[SEG]`/`[REJ]` choice), `mask` (a
PIL "L" image at the original size, 255 inside) and `rejected` (True: the target is not in the image; its mask is
empty). A list of images gives a list of such lists.

Shipped with a Hub repository for ``trust_remote_code``: imports only torch, transformers and its sibling files.
"""

import warnings

import numpy as np
from PIL import Image
from transformers import Pipeline

TASK = "gsva-segmentation"


def check_positive_int(name: str, value) -> None:
    """Refuse a count below 1: a batch size of 0 or -1 would run no batch and return no result, silently."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"gsva-segmentation pipeline: {name} must be an int of at least 1, got {value!r}")


class GSVASegmentationPipeline(Pipeline):
    """Processor -> model (`decide_targets` or `generate`) -> processor, over batches of images."""

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(self, threshold=None, max_new_tokens=None, generate_kwargs=None, **unknown):
        if unknown:
            raise TypeError(f"gsva-segmentation pipeline got unexpected arguments: {sorted(unknown)}")
        if max_new_tokens is not None:
            check_positive_int("max_new_tokens", max_new_tokens)
        forward = {"max_new_tokens": max_new_tokens, "generate_kwargs": generate_kwargs or {}}
        return {}, forward, {"threshold": threshold}

    def __call__(self, images, text=None, targets=None, batch_size=None, **kwargs):
        """images: one image (path, PIL, array) or a list; `targets` (phrases) or `text` (a question), per image or shared."""
        single = not isinstance(images, (list, tuple))
        image_list = [images] if single else list(images)
        if (kwargs.get("generate_kwargs") or {}).get("num_return_sequences", 1) > 1:
            raise ValueError("the pipeline returns one result list per image; num_return_sequences must be 1")
        queries = self.processor.segmentation_queries(len(image_list), text=text, targets=targets)
        _, forward, postprocess = self._sanitize_parameters(**kwargs)
        key = "text" if text is not None else "targets"
        step = batch_size if batch_size is not None else self._batch_size if self._batch_size is not None else 1
        check_positive_int("batch_size", step)
        results = []
        for start in range(0, len(image_list), step):
            chunk = slice(start, start + step)
            inputs = self.preprocess(image_list[chunk], **{key: queries[chunk]})
            outputs = self.forward(inputs, targets_mode=targets is not None, **forward)
            results += self.postprocess(outputs, targets=queries[chunk] if targets is not None else None, **postprocess)
        return results[0] if single else results

    def preprocess(self, images, text=None, targets=None):
        return dict(self.processor(images=images, text=text, targets=targets))

    def _forward(self, model_inputs, targets_mode=False, max_new_tokens=None, generate_kwargs=None):
        if targets_mode:
            return self.model.decide_targets(**model_inputs)
        outputs = self.model.generate(
            **model_inputs, max_new_tokens=max_new_tokens or 128, return_dict_in_generate=True, **(generate_kwargs or {})
        )
        outputs.cache = None
        return outputs

    def postprocess(self, model_outputs, threshold=None, targets=None):
        results = self.processor.post_process_instance_segmentation(
            model_outputs, threshold=0.0 if threshold is None else threshold, targets=targets
        )
        for result in results:
            for problem in result.warnings:
                warnings.warn(f"gsva-segmentation: answer {result.answer!r}: {problem}", stacklevel=3)
        return [
            [
                {
                    "label": target.phrase,
                    "score": target.score,
                    "mask": Image.fromarray(target.mask.numpy().astype(np.uint8) * 255, mode="L"),
                    "rejected": target.rejected,
                }
                for target in result.targets
            ]
            for result in results
        ]
