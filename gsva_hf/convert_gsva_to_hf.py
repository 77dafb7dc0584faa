"""Command line for `gsva_hf.conversion`: write a GSVA folder from a release, from bases, or at random.

  # a GSVA (or LISA) release + the LLaVA it was trained from
  python -m gsva_hf.convert_gsva_to_hf --release gsva-7b-ft-gres.bin --llava LLaVA-Lightning-7B-v1-1 \\
      --lora-r 8 --lora-alpha 16 --output gsva-7b-ft-gres-hf
  # bases to train from: LLaVA (original layout or transformers Llava folder) + SAM (.pth or SamModel folder)
  python -m gsva_hf.convert_gsva_to_hf --llava LLaVA-Lightning-7B-v1-1 --sam sam_vit_h_4b8939.pth \\
      --vision-tower clip-vit-large-patch14 --output gsva-7b-base
  # a random tiny model
  python -m gsva_hf.convert_gsva_to_hf --random --preset tiny --output gsva-tiny-random
"""

import argparse
import logging

from gsva_hf.cli import CommandParser, usage_errors
from gsva_hf.conversion import DTYPES, ConversionError, convert_bases, convert_release, write_random


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="gsva-convert-to-hf", description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--output", required=True, help="folder to write (must be empty unless --overwrite)")
    source = parser.add_argument_group("sources")
    source.add_argument("--release", help="released GSVA/LISA checkpoint (.bin/.pt/.safetensors file or folder)")
    source.add_argument("--llava", help="LLaVA folder: config + tokenizer (+ weights for the base conversion)")
    source.add_argument("--sam", help="SAM: sam_vit_*.pth or a SamModel folder; with --release also vit_b/vit_l/vit_h as a check")
    source.add_argument("--vision-tower", help="CLIP folder or Hub id, when the LLaVA config's mm_vision_tower is not usable")
    source.add_argument("--random", action="store_true", help="write a randomly initialised --preset model")
    source.add_argument("--preset", default="tiny", help="preset for --random")
    lora = parser.add_argument_group("LoRA of a release (merged into the weights)")
    lora.add_argument("--lora-r", type=int, help="training rank; must equal the rank of the LoRA tensors (GSVA: 8 for 7B, 64 for 13B)")
    lora.add_argument("--lora-alpha", type=float, default=16.0, help="training alpha (16 in GSVA and LISA)")
    parser.add_argument("--release-kind", choices=("auto", "gsva", "lisa"), default="auto", help="token layout of the release (auto: from the vocabulary size)")
    parser.add_argument("--image-token", help="image placeholder token; when not given: <im_patch> when the tokenizer has it, else <image>")
    parser.add_argument("--conv-template", choices=("llava_v1", "llava_llama_2"), help="when not given: llava_llama_2 for Llama-2 bases, else llava_v1")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 500MB)")
    parser.add_argument("--allow-missing", action="append", default=[], metavar="GLOB", help="GSVA keys that may be absent (filled from base checkpoints or fresh); repeatable")
    parser.add_argument("--allow-unexpected", action="append", default=[], metavar="GLOB", help="checkpoint keys that may be dropped; repeatable")
    parser.add_argument("--allow-non-finite", action="store_true", help="convert tensors holding NaN/inf anyway (they are listed)")
    parser.add_argument("--sam-decoder-heads", type=int, default=8, help="attention heads of SAM's mask decoder (8 in every official SAM)")
    parser.add_argument("--seed", type=int, default=0, help="seed for freshly initialised tensors")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    common = dict(max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    convert = dict(
        image_token=args.image_token, conv_template=args.conv_template, dtype=DTYPES[args.dtype],
        allow_missing=args.allow_missing, allow_unexpected=args.allow_unexpected,
        decoder_heads=args.sam_decoder_heads, seed=args.seed, vision_tower=args.vision_tower,
        allow_non_finite=args.allow_non_finite, **common,
    )
    with usage_errors("gsva-convert-to-hf", args.debug):
        if args.random:
            if args.release or args.llava:
                raise ConversionError("--random takes no --release/--llava")
            write_random(args.output, args.preset, seed=args.seed, **common)
        elif args.release:
            if not args.llava:
                raise ConversionError("--release needs --llava: the LLaVA base it was trained from (config and tokenizer)")
            convert_release(
                args.release, args.llava, args.output, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                release_kind=args.release_kind, sam=args.sam, **convert,
            )
        elif args.llava:
            if not args.sam:
                raise ConversionError("converting bases needs --sam (sam_vit_*.pth or a SamModel folder)")
            if args.lora_r is not None:
                raise ConversionError("--lora-r applies to --release only")
            convert_bases(args.llava, args.sam, args.output, **convert)
        else:
            raise ConversionError("give --release (with --llava), --llava with --sam, or --random")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
