"""GSVA on any transformers VLM and any SAM-family mask decoder, composed from two pretrained folders.

  gsva-compose --vlm Qwen/Qwen2.5-VL-3B-Instruct --mask-decoder facebook/sam2.1-hiera-large --output gsva-qwen-sam2

The VLM (any `AutoModelForImageTextToText` folder of a family in `processing_gsva.VLM_FAMILIES`: model, tokenizer with
its chat template, image processor) and the mask decoder (a SAM, SAM-HQ, SAM 2 or EdgeTAM folder: model and image
processor) are loaded as they are; `[SEG]` and `[REJ]` join the tokenizer as special tokens, the embeddings grow by
their rows (the mean of the existing rows, transformers' `resize_token_embeddings`), `text_hidden_fcs` is drawn fresh
(PyTorch's default init, as GSVA), and the folder is written complete: safetensors, processor, remote code.
"""

import argparse
import json
import logging
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoTokenizer,
    GenerationConfig,
    ViTImageProcessorPil,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from configuration_gsva import MASK_DECODER_TYPES, GSVAConfig
from gsva_hf.cli import CommandParser, UsageError, usage_errors
from gsva_hf.conversion.assembly import _prepare_output
from gsva_hf.export import save_folder
from modeling_gsva import GSVAForCausalLM, build_text_hidden_fcs
from processing_gsva import REJ_TOKEN, SEG_TOKEN, VLM_FAMILIES, GSVAProcessor

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ComposeError(UsageError):
    """A VLM or mask decoder GSVA cannot be built on, or an output folder it cannot write."""


def check_vlm_config(config, source: str) -> None:
    """Refuse what is not a vision-language model of a family the processor can prompt, naming what is missing."""
    kind = getattr(config, "model_type", None)
    if kind not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        what = "a text-only language model" if getattr(config, "vision_config", None) is None else "not an image-text model"
        raise ComposeError(
            f"--vlm {source}: model_type {kind!r} is {what}: AutoModelForImageTextToText cannot load it, and GSVA "
            "needs a model that reads the image (e.g. qwen2_5_vl, qwen3_vl, llava, idefics3, smolvlm, gemma3)"
        )
    if kind not in VLM_FAMILIES:
        raise ComposeError(
            f"--vlm {source}: {kind!r} is a vision-language model, but GSVA's processor has no image rule for its "
            f"family yet; supported: {', '.join(sorted(VLM_FAMILIES))}"
        )
    if getattr(config, "image_token_id", None) is None:
        raise ComposeError(f"--vlm {source}: its config names no image_token_id")


def check_mask_decoder_config(config, source: str) -> None:
    kind = getattr(config, "model_type", None)
    if kind not in MASK_DECODER_TYPES:
        raise ComposeError(
            f"--mask-decoder {source}: model_type {kind!r} is not a SAM-family mask decoder (no prompt encoder taking "
            f"sparse prompts); supported: {', '.join(MASK_DECODER_TYPES)}"
        )


def image_seq_length(config) -> int | None:
    """Image tokens per image (LLaVA-1.5, Gemma 3) or per crop (Idefics3, SmolVLM), from the VLM's config; None where
    the image processor's output decides it (Qwen's grid)."""
    rule = VLM_FAMILIES[config.model_type]["expand"]
    vision = getattr(config, "vision_config", None)
    if rule == "fixed":
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches + (1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0)
    if rule == "gemma3":
        return int(config.mm_tokens_per_image)
    if rule == "tiles":
        return int((vision.image_size // vision.patch_size) ** 2 / config.scale_factor**2)
    return None


def mask_image_processor(source: str, kind: str):
    """The mask decoder's image processor. SAM 2 and EdgeTAM resize the whole image to a square and normalise, which
    their own class needs torchvision for; without it the same steps come from `ViTImageProcessorPil` (bilinear resize
    to the folder's size, rescale 1/255, the folder's mean and std)."""
    from transformers.utils import cached_file, is_torchvision_available

    if kind not in ("sam2", "edgetam") or is_torchvision_available():
        return AutoImageProcessor.from_pretrained(source)

    settings = json.loads(Path(cached_file(source, "preprocessor_config.json")).read_text())
    size = settings.get("size") or {"height": 1024, "width": 1024}
    logger.info("--mask-decoder %s: torchvision is missing; its square resize comes from ViTImageProcessorPil", source)
    return ViTImageProcessorPil(
        size={"height": int(size["height"]), "width": int(size["width"])},
        image_mean=settings.get("image_mean"),
        image_std=settings.get("image_std"),
        rescale_factor=settings.get("rescale_factor", 1 / 255),
        resample=2,
    )


def add_slot_tokens(tokenizer) -> dict[str, int]:
    """`[SEG]` and `[REJ]` as special tokens (typed text never becomes them); a pad token when the VLM has none."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    missing = [t for t in (SEG_TOKEN, REJ_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return {t: tokenizer.convert_tokens_to_ids(t) for t in (SEG_TOKEN, REJ_TOKEN)}


def never_generated(tokenizer, generation_config, slot_ids) -> list[int]:
    """The VLM's special tokens an answer never holds (image markers, tile and turn-opening tokens): every special
    token but the end-of-turn ones, padding and `[SEG]`/`[REJ]`."""
    eos = generation_config.eos_token_id
    keep = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id, tokenizer.pad_token_id, *slot_ids}
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return sorted(special - keep)


def compose_gsva(
    vlm: str,
    mask_decoder: str,
    output: str | Path | None = None,
    *,
    dtype: str = "float32",
    seed: int = 0,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
):
    """Build GSVA from a VLM folder (or Hub id) and a SAM-family folder (or Hub id); write it to `output` when
    given. Returns `(model, processor)`."""
    if dtype not in DTYPES:
        raise ComposeError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    output_dir = _prepare_output(output, overwrite) if output is not None else None
    vlm_config = AutoConfig.from_pretrained(vlm)
    check_vlm_config(vlm_config, vlm)
    sam_config = AutoConfig.from_pretrained(mask_decoder)
    check_mask_decoder_config(sam_config, mask_decoder)
    tokenizer = AutoTokenizer.from_pretrained(vlm)
    if not tokenizer.chat_template:
        raise ComposeError(f"--vlm {vlm}: its tokenizer has no chat template; GSVA renders its prompts through it")
    image_processor = AutoImageProcessor.from_pretrained(vlm)
    sam_processor = mask_image_processor(mask_decoder, sam_config.model_type)
    ids = add_slot_tokens(tokenizer)

    torch_dtype = DTYPES[dtype]
    vlm_model = AutoModelForImageTextToText.from_pretrained(vlm, dtype=torch_dtype)
    sam_model = AutoModel.from_pretrained(mask_decoder, dtype=torch_dtype)
    # The new rows are drawn around the mean of the old ones; the seed makes a composition reproducible.
    torch.manual_seed(seed)
    if len(tokenizer) > vlm_model.get_input_embeddings().num_embeddings:
        vlm_model.resize_token_embeddings(len(tokenizer))
    if sam_config.model_type in ("sam2", "edgetam"):
        # GSVA trains one mask per [SEG]; SAM 2's eval-time swap to a multimask output would bypass it.
        sam_model.config.mask_decoder_config.dynamic_multimask_via_stability = False
        sam_model.mask_decoder.dynamic_multimask_via_stability = False

    config = GSVAConfig(
        vlm_config=vlm_model.config,
        sam_config=sam_model.config,
        image_token_id=vlm_model.config.image_token_id,
        im_start_token_id=None,
        im_end_token_id=None,
        seg_token_id=ids[SEG_TOKEN],
        rej_token_id=ids[REJ_TOKEN],
        out_dim=sam_model.config.prompt_encoder_config.hidden_size,
    )
    with torch.device("meta"):
        model = GSVAForCausalLM(config)
    model.model.vlm = vlm_model
    model.model.sam = sam_model
    torch.manual_seed(seed)
    model.model.text_hidden_fcs = build_text_hidden_fcs(config.get_text_config().hidden_size, config.out_dim).to(torch_dtype)
    model.config.dtype = torch_dtype
    model.generation_config = GenerationConfig.from_dict(vlm_model.generation_config.to_dict())
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.suppress_tokens = never_generated(tokenizer, model.generation_config, ids.values())
    model.eval()

    processor = GSVAProcessor(
        image_processor,
        sam_processor,
        tokenizer,
        chat_template=tokenizer.chat_template,
        backbone=vlm_config.model_type,
        image_token=tokenizer.convert_ids_to_tokens(config.image_token_id),
        image_seq_length=image_seq_length(vlm_model.config),
    )
    processor.check_config(config)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_folder(model, processor, output_dir, max_shard_size)
        logger.info("wrote %s: %s + %s", output_dir, vlm, mask_decoder)
    return model, processor


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="gsva-compose", description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:])
    )
    parser.add_argument("--vlm", required=True, help="vision-language model: folder or Hub id (AutoModelForImageTextToText)")
    parser.add_argument("--mask-decoder", required=True, help="SAM, SAM-HQ, SAM 2 or EdgeTAM: folder or Hub id")
    parser.add_argument("--output", required=True, help="folder to write (must be empty unless --overwrite)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh text_hidden_fcs and the new [SEG]/[REJ] embedding rows")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with usage_errors("gsva-compose", args.debug):
        compose_gsva(
            args.vlm, args.mask_decoder, args.output, dtype=args.dtype, seed=args.seed, overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
