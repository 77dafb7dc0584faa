"""`pipeline(model=FOLDER_OR_REPO, trust_remote_code=True)`: GSVA as an image-segmentation-style pipeline.

    pipe = pipeline(model="you/gsva-7b", trust_remote_code=True)
    pipe(image, targets=["the man on the left", "the red car"])    # one result per phrase, in order
    pipe(image, text="What are the people in this image?")          # the model's own answer decides the targets

Each result is a dict: `label` (the phrase), `score` (probability of the model's `[SEG]`/`[REJ]` choice), `mask` (a
PIL "L" image at the original size, 255 inside) and `rejected` (True: the target is not in the image; its mask is
empty). A list of images gives a list of such lists.

`segment(model, processor, images, targets=... | text=...)` runs the same loop and returns `SegmentationResult`s
(`model.segment(processor, ...)` forwards to it).

Shipped with a Hub repository for ``trust_remote_code``: imports only torch, transformers and its sibling files.
"""

import warnings

import numpy as np
from PIL import Image
from transformers import Pipeline

TASK = "gsva-segmentation"


def check_positive_int(name: str, value, where: str = "segment()") -> None:
    """Refuse a count below 1: a batch size of 0 or -1 would run no batch and return no result, silently."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {name} must be an int of at least 1, got {value!r}")


def model_outputs(model, inputs, targets_mode: bool, generate_kwargs: dict):
    """The model step of one batch: `decide_targets` (target mode) or `generate` with masks; the processor's
    sizes stay in `inputs` for post-processing (the model ignores them)."""
    if targets_mode:
        return model.decide_targets(**inputs)
    return model.generate(**inputs, return_dict_in_generate=True, **generate_kwargs)


def segment_batches(
    model, processor, images, text=None, targets=None, batch_size: int = 8, threshold: float = 0.0, generate_kwargs=None
) -> list:
    """The one processor -> model -> processor loop (the pipeline and `segment` run it): per image one
    `SegmentationResult`, over batches of `batch_size` images. `generate_kwargs` go to `generate` (question mode)."""
    generate_kwargs = dict(generate_kwargs or {})
    if (generate_kwargs.get("num_return_sequences") or 1) > 1:
        raise ValueError(
            "segment() and the pipeline return one result per image; for several answers per image call "
            "model.generate(..., num_return_sequences=n, return_dict_in_generate=True) and "
            "processor.post_process_instance_segmentation"
        )
    image_list = list(images) if isinstance(images, (list, tuple)) else [images]
    queries = processor.segmentation_queries(len(image_list), text=text, targets=targets)
    key = "text" if text is not None else "targets"
    results = []
    for start in range(0, len(image_list), batch_size):
        chunk = slice(start, start + batch_size)
        inputs = processor(images=image_list[chunk], **{key: queries[chunk]})
        outputs = model_outputs(model, inputs.to(model.device), targets is not None, generate_kwargs)
        results += processor.post_process_instance_segmentation(
            outputs,
            target_sizes=inputs["original_sizes"],
            threshold=threshold,
            targets=queries[chunk] if targets is not None else None,
        )
    return results


def segment(
    model,
    processor,
    images,
    text: str | list[str] | None = None,
    targets: list[str] | list[list[str]] | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    threshold: float = 0.0,
    batch_size: int = 8,
    **generate_kwargs,
) -> list:
    """Image(s) + a question or target phrases in, per image one `SegmentationResult` out.

    targets: phrases per image (target mode, `decide_targets`): exactly one result per phrase, in order.
    text: a question per image (free generation, `generate`): the model's own answer decides the targets.
    `GSVAForCausalLM.segment(processor, ...)` forwards here.
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("max_new_tokens", max_new_tokens)
    options = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, **generate_kwargs}
    return segment_batches(model, processor, images, text, targets, batch_size, threshold, options)


class GSVASegmentationPipeline(Pipeline):
    """`segment_batches` (processor -> model -> processor) with the results as dicts and warnings."""

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(self, threshold=None, max_new_tokens=None, generate_kwargs=None, **unknown):
        if unknown:
            raise TypeError(f"gsva-segmentation pipeline got unexpected arguments: {sorted(unknown)}")
        if max_new_tokens is not None:
            check_positive_int("max_new_tokens", max_new_tokens, TASK + " pipeline")
        forward = {"max_new_tokens": max_new_tokens, "generate_kwargs": generate_kwargs or {}}
        return {}, forward, {"threshold": threshold}

    def __call__(self, images, text=None, targets=None, batch_size=None, **kwargs):
        """images: one image (path, PIL, array) or a list; `targets` (phrases) or `text` (a question), per image or shared."""
        _, forward, postprocess = self._sanitize_parameters(**kwargs)
        step = batch_size if batch_size is not None else self._batch_size if self._batch_size is not None else 1
        check_positive_int("batch_size", step, TASK + " pipeline")
        generate_kwargs = {"max_new_tokens": forward["max_new_tokens"] or 128, **forward["generate_kwargs"]}
        threshold = postprocess["threshold"]
        results = segment_batches(
            self.model, self.processor, images, text, targets, step, 0.0 if threshold is None else threshold, generate_kwargs
        )
        found = []
        for result in results:
            found.append(self._as_dicts(result))
        return found if isinstance(images, (list, tuple)) else found[0]

    # Pipeline's single-batch steps; `__call__` runs them as `segment_batches`.
    def preprocess(self, images, text=None, targets=None):
        return dict(self.processor(images=images, text=text, targets=targets))

    def _forward(self, model_inputs, targets_mode=False, max_new_tokens=None, generate_kwargs=None):
        options = {"max_new_tokens": max_new_tokens or 128, **(generate_kwargs or {})}
        return model_outputs(self.model, model_inputs, targets_mode, options)

    def postprocess(self, model_outputs, target_sizes=None, threshold=None, targets=None):
        results = self.processor.post_process_instance_segmentation(
            model_outputs, target_sizes=target_sizes, threshold=0.0 if threshold is None else threshold, targets=targets
        )
        return [self._as_dicts(result) for result in results]

    @staticmethod
    def _as_dicts(result) -> list[dict]:
        """One image's targets as the pipeline's dicts; the answer's warnings become Python warnings."""
        for problem in result.warnings:
            warnings.warn(f"gsva-segmentation: answer {result.answer!r}: {problem}", stacklevel=3)
        return [
            {
                "label": target.phrase,
                "score": target.score,
                "mask": Image.fromarray(target.mask.numpy().astype(np.uint8) * 255, mode="L"),
                "rejected": target.rejected,
            }
            for target in result.targets
        ]
