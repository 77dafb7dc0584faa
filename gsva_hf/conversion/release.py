"""A released GSVA or LISA checkpoint (DeepSpeed `zero_to_fp32` dump of the PEFT-wrapped original model,
LoRA unmerged) plus the LLaVA base it was trained from → GSVA folder.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch

from processing_gsva import IM_END_TOKEN, IM_START_TOKEN, REJ_TOKEN, SEG_TOKEN, GSVAProcessor

from .assembly import (
    _apply_rows,
    _check,
    _materialise,
    _prepare_output,
    _save,
    _vocabulary_items,
)
from .common import ConversionError, ConversionReport, TensorStore, _expected_shapes, _Item, _read_item
from .llava import (
    LlavaBase,
    _base_llava_items,
    _clip_store,
    _clip_target,
    _default_image_token,
    _ids_from,
    _original_targets,
    _projector_type,
    gsva_for_base,
    load_llava_base,
)
from .lora import unwrap_peft
from .sam import SAM_VARIANTS, _check_sam_variant, _sam_store_and_config, sam_config_from_shapes, sam_rename_plan


def _add_tokens(tokenizer, tokens: Sequence[str]) -> None:
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)


def release_tokenizer(base, rows: int, release_kind: str, image_token: str | None, origin: str):
    """The release's tokenizer: the LLaVA base one plus the tokens its training added, in the original order.

    GSVA added `[SEG]`, `[REJ]`, then `<im_start>`/`<im_end>`; LISA `[SEG]`, then `<im_start>`/`<im_end>` (no
    `[REJ]`). The embedding row count must equal that tokenizer's length; `[REJ]` (LISA) and the image token
    are then appended as new rows. Returns the tokenizer, the release kind and the ids that got new rows.
    """
    base_size = len(base)
    expectations = {}
    for kind, order in (("gsva", (SEG_TOKEN, REJ_TOKEN, IM_START_TOKEN, IM_END_TOKEN)), ("lisa", (SEG_TOKEN, IM_START_TOKEN, IM_END_TOKEN))):
        trial = copy.deepcopy(base)
        _add_tokens(trial, order)
        expectations[kind] = (len(trial), {t: trial.convert_tokens_to_ids(t) for t in order})
    if release_kind == "auto":
        matches = [k for k, (size, _) in expectations.items() if size == rows]
        release_kind = matches[0] if matches else "gsva"
    if expectations[release_kind][0] != rows:
        detail = "; ".join(
            f"a {k.upper()} release needs {n} rows ({', '.join(f'{t}={i}' for t, i in tid.items())})"
            for k, (n, tid) in expectations.items()
        )
        raise ConversionError(
            f"vocabulary mismatch: {origin} has {rows} rows, but the base tokenizer has {base_size} tokens, so {detail}. "
            "Use the LLaVA base the checkpoint was trained from."
        )
    tokenizer = copy.deepcopy(base)
    _add_tokens(tokenizer, (SEG_TOKEN, IM_START_TOKEN, IM_END_TOKEN) if release_kind == "lisa" else (SEG_TOKEN, REJ_TOKEN, IM_START_TOKEN, IM_END_TOKEN))
    GSVAProcessor.add_gsva_tokens(tokenizer, image_token or _default_image_token(base))
    return tokenizer, release_kind, _ids_from(tokenizer, rows)


def convert_release(
    checkpoint: str | Path,
    llava_base: str | Path,
    output_dir: str | Path,
    *,
    lora_r: int | None = None,
    lora_alpha: float = 16.0,
    release_kind: str = "auto",
    vision_tower: str | None = None,
    sam: str | None = None,
    image_token: str | None = None,
    conv_template: str | None = None,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "5GB",
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
    decoder_heads: int = 8,
    seed: int = 0,
    overwrite: bool = False,
    allow_non_finite: bool = False,
) -> ConversionReport:
    """A GSVA (`gsva-7b-*.bin`, ...) or LISA release → GSVA folder.

    `llava_base` gives the language-model config and tokenizer (weights only for `allow_missing` fallbacks);
    `vision_tower` the CLIP config when the base's `mm_vision_tower` cannot be resolved offline; `sam` is a
    variant name (`vit_h`) or checkpoint checked against the release's SAM shapes.
    """
    if release_kind not in ("auto", "gsva", "lisa"):
        raise ConversionError(f"release_kind must be auto, gsva or lisa, got {release_kind!r}")
    output_dir = _prepare_output(output_dir, overwrite)
    report = ConversionReport(sources=[f"release {checkpoint}", f"LLaVA base {llava_base} (config, tokenizer)"])
    base = load_llava_base(llava_base)
    store = TensorStore.open(checkpoint)
    items = unwrap_peft(store, lora_r=lora_r, lora_alpha=lora_alpha, report=report)

    sam_shapes = {k[len("model.visual_model."):]: v.shape for k, v in items.items() if k.startswith("model.visual_model.")}
    if not sam_shapes:
        raise ConversionError(f"{checkpoint}: no SAM tensors (model.visual_model.*); is this a GSVA/LISA release?")
    try:
        sam_config = sam_config_from_shapes(sam_shapes, decoder_heads)
    except ConversionError as error:
        raise ConversionError(f"{checkpoint} (model.visual_model.*): {error}") from error
    _check_sam_variant(sam, sam_config, decoder_heads)
    sam_plan = sam_rename_plan(sam_shapes)
    targets, unmapped = {}, []
    for key, item in items.items():
        names = _original_targets(key, sam_plan)
        if names is None:
            unmapped.append(item)
            continue
        if not names:
            report.dropped.append(f"{item.origin} (derived buffer, recomputed)")
        for name in names:
            targets[name] = item

    rows, _ = _vocabulary_items(targets)
    tokenizer, kind, new_ids = release_tokenizer(base.tokenizer, rows, release_kind, image_token, targets["language_model.model.embed_tokens.weight"].origin)
    image_token = image_token or _default_image_token(base.tokenizer)
    vocab_size = len(tokenizer)
    if new_ids:
        _apply_rows(targets, vocab_size, sorted(new_ids.values()), rows, "rows added")
        report.added_rows = new_ids
    report.notes.append(f"{kind.upper()} release; vocabulary {rows} rows in the checkpoint, {vocab_size} after conversion")

    projector_type = _projector_type(items, base)
    out_item = targets.get("text_hidden_fcs.0.2.weight")
    out_dim = out_item.shape[0] if out_item is not None else sam_config.prompt_encoder_config.hidden_size
    _, processor, model = gsva_for_base(
        base, vision_tower, sam_config, tokenizer, image_token, conv_template,
        projector_type=projector_type, vocab_size=vocab_size, out_dim=out_dim,
    )
    expected = _expected_shapes(model)
    fallback = {}
    if allow_missing:
        fallback = _base_fallback(base, vision_tower, sam, decoder_heads, report)
    plan = _check(targets, unmapped, expected, allow_missing, allow_unexpected, fallback, model, seed, report)
    _materialise(model, plan, dtype, report, allow_non_finite)
    training = (
        f"as released in {Path(checkpoint).name} ({kind.upper()}, trained by its authors: see "
        + ("https://github.com/LeapLabTHU/GSVA" if kind == "gsva" else "https://github.com/dvlab-research/LISA")
        + "); this folder converts it and trains nothing"
    )
    return _save(model, processor, output_dir, max_shard_size, report, f"{Path(checkpoint).stem} (GSVA, transformers)", training)


def _base_fallback(base: LlavaBase, vision_tower: str | None, sam: str | None, decoder_heads: int, report: ConversionReport) -> dict[str, _Item]:
    """Tensors the base checkpoints could provide for `--allow-missing` keys of a release."""
    fallback: dict[str, _Item] = {}
    if base.has_weights():
        fallback.update(_base_llava_items(base, ConversionReport())[0])
    name = vision_tower or base.vision_name
    if name and (vision_tower or Path(name).is_dir()):
        clip = _clip_store(name)
        for key in clip.keys():
            target = _clip_target(key)
            if target is not None:
                fallback.setdefault(target, _read_item(clip, key))
    if sam and sam not in SAM_VARIANTS:
        fallback.update(_sam_store_and_config(sam, decoder_heads)[0])
    return fallback
