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


class GSVASegmentationPipeline(Pipeline):
    """Processor -> model (`decide_targets` or `generate`) -> processor, over batches of images."""

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(
        self, text=None, targets=None, threshold=None, max_new_tokens=None, generate_kwargs=None, **unknown
    ):
        if unknown:
            raise TypeError(f"gsva-segmentation pipeline got unexpected arguments: {sorted(unknown)}")
        preprocess = {"text": text, "targets": targets}
        forward = {"max_new_tokens": max_new_tokens, "generate_kwargs": generate_kwargs or {}}
        postprocess = {"threshold": threshold, "targets": targets}
        return preprocess, forward, postprocess

    def __call__(self, images, text=None, targets=None, batch_size=None, **kwargs):
        """images: one image (path, PIL, array) or a list; `targets` (phrases) or `text` (a question), per image or shared."""
        single = not isinstance(images, (list, tuple))
        image_list = [images] if single else list(images)
        if (kwargs.get("generate_kwargs") or {}).get("num_return_sequences", 1) > 1:
            raise ValueError("the pipeline returns one result list per image; num_return_sequences must be 1")
        queries = self.processor.segmentation_queries(len(image_list), text=text, targets=targets)
        preprocess, forward, postprocess = self._sanitize_parameters(text=text, targets=targets, **kwargs)
        step = batch_size or self._batch_size or 1
        results = []
        for start in range(0, len(image_list), step):
            chunk = slice(start, start + step)
            key = "text" if text is not None else "targets"
            inputs = self.preprocess(image_list[chunk], **{key: queries[chunk]})
            outputs = self.forward(inputs, **forward)
            results += self.postprocess(outputs, threshold=postprocess["threshold"], targets=inputs.get("queries"))
        return results[0] if single else results

    def preprocess(self, images, text=None, targets=None):
        images = images if isinstance(images, (list, tuple)) else [images]
        if targets is not None:
            inputs = dict(self.processor(images=images, targets=targets))
            inputs["queries"] = self.processor.segmentation_queries(len(images), targets=targets)
            return inputs
        return dict(self.processor(images=images, text=text))

    def _forward(self, model_inputs, max_new_tokens=None, generate_kwargs=None):
        model_inputs = dict(model_inputs)
        queries = model_inputs.pop("queries", None)
        for key in ("pixel_values", "sam_pixel_values"):
            model_inputs[key] = model_inputs[key].to(self.model.dtype)
        if queries is not None:
            outputs = self.model.decide_targets(**model_inputs)
        else:
            outputs = self.model.generate(
                **model_inputs,
                max_new_tokens=max_new_tokens or 128,
                return_dict_in_generate=True,
                **(generate_kwargs or {}),
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
