"""The tiny Qwen2.5-VL + SAM 2 GSVA of the learning curve in BENCHMARKS.md, from random weights.

  python examples/tiny_synthetic/compose_qwen_sam2.py outputs/qwen-sam2-tiny --lm_init_std 0.088 --vision_pretrain_steps 300

Sizes follow the bundled LLaVA-v1 model where the families allow (language model 2 layers of width 128 with 16 heads,
a 2-block vision tower, the mask decoder at 128 px with 64-wide prompts); the tokenizer is the synthetic task's, with
Qwen's special tokens. The two parts are saved as Hub-like folders and composed with `gsva-compose`'s function.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, Qwen2VLImageProcessorPil

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.tiny_synthetic.from_scratch import draw_language_model, draw_vision_tower  # noqa: E402
from examples.tiny_synthetic.probe_mask_decoder import pretrain_mask_path  # noqa: E402
from examples.tiny_synthetic.vision_pretraining import pretrain_vision, rebase_on_discriminants  # noqa: E402
from gsva_hf.compose import compose_gsva  # noqa: E402
from gsva_hf.export import save_folder  # noqa: E402
from gsva_hf.metrics import strict_json  # noqa: E402
from gsva_hf.tiny_parts import _sam2_image_processor_dict, tiny_mask_decoder_config, tiny_tokenizer  # noqa: E402

WIDTH, HEADS = 128, 16
VISION_ROPE_THETA = ROPE_THETA = 10000.0  # Qwen2.5-VL's own


def mrope_section(head_dim: int) -> list[int]:
    """M-RoPE's split of a head's rotary frequencies over time, height and width: Qwen2.5-VL's 16/24/24 of 64 scaled
    to `head_dim // 2` ([1, 1, 2] at 8, [4, 6, 6] at 32)."""
    half = head_dim // 2
    if half < 4:
        raise ValueError(f"a head of {head_dim} dims is too narrow for M-RoPE's three sections")
    time = max(1, round(half * 16 / 64))
    height = (half - time) // 2
    return [time, height, half - time - height]


def parse_mrope_section(text: str, head_dim: int) -> list[int]:
    """`--mrope_section T,H,W`: three positive counts of a head's rotary frequencies that sum to head_dim / 2."""
    try:
        sections = [int(part) for part in text.split(",")]
    except ValueError:
        sections = []
    if len(sections) != 3 or min(sections) < 1 or sum(sections) != head_dim // 2:
        raise ValueError(
            f"--mrope_section: expected three positive integers summing to half the head size ({head_dim // 2} for heads "
            f"of {head_dim}), got {text!r}"
        )
    return sections


def qwen_config(
    tokenizer, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2, width: int = WIDTH, heads: int = HEADS,
    intermediate_size: int | None = None, full_attention_blocks: tuple[int, ...] = (1,), vision_rope_theta: float = VISION_ROPE_THETA,
    rope_theta: float = ROPE_THETA, rope_sections: list[int] | None = None,
):
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
    )}  # fmt: skip
    text = dict(
        hidden_size=width, intermediate_size=intermediate_size or 4 * width, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=heads, vocab_size=len(tokenizer), max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": rope_sections or mrope_section(width // heads)},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    vision = dict(depth=2, hidden_size=64, intermediate_size=256, num_heads=4, out_hidden_size=width, patch_size=patch_size,
                  spatial_merge_size=merge_size, temporal_patch_size=temporal_patch_size, window_size=2 * patch_size * merge_size,
                  fullatt_block_indexes=list(full_attention_blocks),
                  rope_parameters={"rope_type": "axial", "rope_theta": vision_rope_theta})  # fmt: skip
    return AutoConfig.for_model("qwen2_5_vl", text_config=text, vision_config=vision, **ids)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="folder of the composed GSVA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset_dir", default="data/synthetic", help="the synthetic task, for the vision stage")
    parser.add_argument("--vision_pretrain_steps", type=int, default=0, help="vision stage steps (0: none)")
    parser.add_argument("--vision_pretrain_learning_rate", type=float, default=2e-3)
    parser.add_argument("--patch_size", type=int, default=14, help="the vision tower's patch side in pixels")
    parser.add_argument("--merge_size", type=int, default=2, help="patches merged per side into one image token")
    parser.add_argument(
        "--temporal_patch_size", type=int, default=2, help="frames per patch (an image is repeated to fill them)"
    )
    parser.add_argument("--width", type=int, default=WIDTH, help="the language model's hidden size")
    parser.add_argument("--heads", type=int, default=HEADS, help="its attention heads (Qwen2.5-VL: head size = width / heads)")
    parser.add_argument("--intermediate_size", type=int, help="its MLP's hidden size (default: 4 x width)")
    parser.add_argument(
        "--full_attention_blocks", default="1", help="comma-separated vision blocks with full attention (the others: windows)"
    )
    parser.add_argument("--lm_init_std", type=float, help="redraw the language model at this std (train_tiny.py's option)")
    parser.add_argument(
        "--vision_rope_theta", type=float, default=VISION_ROPE_THETA, help="the tower's rotary base (smaller: faster turns per patch)"
    )
    parser.add_argument("--vision_init_std", type=float, help="redraw the vision tower's linear layers at this std")
    parser.add_argument(
        "--rope_theta", type=float, default=ROPE_THETA,
        help="the language model's rotary base (a head of 8 dims turns at 4 frequencies: 1, 0.1, 0.01 and 0.001 "
        "radians per token at 10,000; 1, 0.32, 0.1 and 0.03 at 100)",
    )
    parser.add_argument(
        "--mrope_section",
        help="T,H,W: how many of a head's rotary frequencies, fastest first, turn with an image token's time, row "
        "and column (sum: head size / 2; default Qwen's 16/24/24 of 64 scaled). Text tokens turn with all three "
        "alike, so this only changes the image tokens: frequencies given to time do not vary within an image",
    )
    parser.add_argument(
        "--mask_decoder_init", choices=("sam2", "gsva"), default="sam2",
        help="draw SAM 2 as transformers does (sam2: normal(0.02)) or as GSVA draws a from-scratch SAM (gsva: "
        "PyTorch's default layer init, the bundled recipe's)",
    )
    parser.add_argument("--mask_decoder_heads", type=int, default=2, help="the mask decoder's attention heads (the bundled SAM's: 4)")
    parser.add_argument("--mask_decoder_mlp_dim", type=int, default=64, help="its MLP's hidden size (the bundled SAM's: 256)")
    parser.add_argument(
        "--discriminant_tokens", type=int,
        help="after the stage, re-base the tokens onto their K most discriminant directions for the patch labels of "
        "up to 2,048 train images (rebase_on_discriminants; its random directions have their own fixed seed)",
    )  # fmt: skip
    parser.add_argument(
        "--mask_pretrain_steps", type=int, default=0,
        help="last, train the mask path (SAM 2 and text_hidden_fcs) this many steps from learned prompts naming the "
        "task's targets (pretrain_mask_path: the stand-in for a pretrained SAM 2; 0: none)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.mask_pretrain_steps < 0:
        parser.error(f"--mask_pretrain_steps must be >= 0, got {args.mask_pretrain_steps}")
    if args.discriminant_tokens is not None and not args.vision_pretrain_steps:
        parser.error("--discriminant_tokens re-bases the tokens the vision stage trained: give --vision_pretrain_steps too")
    if args.discriminant_tokens is not None and not 0 < args.discriminant_tokens < args.width:
        parser.error(f"--discriminant_tokens must be between 1 and --width - 1 ({args.width - 1}), got {args.discriminant_tokens}")
    if args.width % args.heads:
        parser.error(f"--width ({args.width}) must be a multiple of --heads ({args.heads}): Qwen2.5-VL's head size is width / heads")
    try:
        sections = parse_mrope_section(args.mrope_section, args.width // args.heads) if args.mrope_section else None
    except ValueError as error:
        parser.error(str(error))
    parts = Path(args.output).with_name(Path(args.output).name + "-parts")
    tokenizer = tiny_tokenizer("qwen2_5_vl")
    torch.manual_seed(args.seed)
    vlm = AutoModelForImageTextToText.from_config(qwen_config(
        tokenizer, patch_size=args.patch_size, merge_size=args.merge_size, temporal_patch_size=args.temporal_patch_size,
        width=args.width, heads=args.heads, intermediate_size=args.intermediate_size,
        full_attention_blocks=tuple(int(block) for block in args.full_attention_blocks.split(",") if block.strip()),
        vision_rope_theta=args.vision_rope_theta, rope_theta=args.rope_theta, rope_sections=sections,
    ))  # fmt: skip
    vlm.generation_config.eos_token_id = tokenizer.eos_token_id
    vlm.generation_config.pad_token_id = tokenizer.pad_token_id
    vlm.save_pretrained(parts / "vlm")
    tokenizer.save_pretrained(parts / "vlm")
    # Images are resized to a multiple of one token's side: 128 px give 25 tokens of 28 px at the defaults, 64 tokens
    # of 16 px with --patch_size 16 --merge_size 1.
    token = args.patch_size * args.merge_size
    side = -(-128 // token) * token
    Qwen2VLImageProcessorPil(
        size={"shortest_edge": 4 * token * token, "longest_edge": side * side}, patch_size=args.patch_size, merge_size=args.merge_size,
        temporal_patch_size=args.temporal_patch_size,
    ).save_pretrained(parts / "vlm")  # fmt: skip
    sam_config = tiny_mask_decoder_config("sam2")
    sam_config.prompt_encoder_config.image_size = 128
    sam_config.prompt_encoder_config.hidden_size = 64
    sam_config.mask_decoder_config.hidden_size = 64
    sam_config.mask_decoder_config.num_attention_heads = args.mask_decoder_heads
    sam_config.mask_decoder_config.mlp_dim = args.mask_decoder_mlp_dim
    sam_config.vision_config.fpn_hidden_size = 64
    sam_config.vision_config.backbone_config.image_size = [128, 128]
    sam_config.vision_config.backbone_feature_sizes = [[32, 32], [16, 16], [8, 8]]
    sam = AutoModel.from_config(sam_config)
    sam.save_pretrained(parts / "sam2")
    settings = _sam2_image_processor_dict()
    settings.update(size={"height": 128, "width": 128}, mask_size={"height": 32, "width": 32})
    (parts / "sam2" / "preprocessor_config.json").write_text(json.dumps(settings, indent=2, allow_nan=False) + "\n")
    model, processor = compose_gsva(str(parts / "vlm"), str(parts / "sam2"), seed=args.seed)
    if args.lm_init_std is not None:
        draw_language_model(model, args.lm_init_std)
    if args.vision_init_std is not None:
        draw_vision_tower(model, args.vision_init_std)
    seconds = 0.0
    if args.vision_pretrain_steps:
        # Eager attention: faster than SDPA for this tower's many small windows on a CPU (same numbers up to rounding).
        model.set_attn_implementation("eager")
        # The stand-in for a pretrained vision tower, as train_tiny.py's stage gives the LLaVA-v1 preset.
        report = pretrain_vision(
            model, processor.image_processor, args.dataset_dir, args.vision_pretrain_steps, seed=args.seed,
            learning_rate=args.vision_pretrain_learning_rate, target="both", log_every=250,
        )  # fmt: skip
        if args.discriminant_tokens is not None:
            report["rebase"] = rebase_on_discriminants(model, processor.image_processor, args.dataset_dir, args.discriminant_tokens)
            report["seconds"] += report["rebase"]["seconds"]
            print(f"re-based the tokens on {report['rebase']['images']} train images")
        (parts / "vision_pretraining.json").write_text(strict_json(report, "vision_pretraining.json") + "\n")
        print(f"vision stage: {report['seconds']:.0f} s")
        seconds += report["seconds"]
    if args.mask_decoder_init == "gsva":
        # After the other draws and from its own seed, so the option leaves every other draw as it is.
        torch.manual_seed(args.seed)
        model.model.draw_mask_path()
    if args.mask_pretrain_steps:
        report = pretrain_mask_path(model, processor, args.dataset_dir, args.mask_pretrain_steps, seed=args.seed, log_every=100)
        (parts / "mask_pretraining.json").write_text(strict_json(report, "mask_pretraining.json") + "\n")
        print(f"mask stage: {report['seconds']:.0f} s, val cIoU {report['val_ciou']:.4f} from ideal prompts")
        seconds += report["seconds"]
    if seconds:
        print(f"stages: {seconds:.0f} s (pass --clock_offset_seconds {seconds:.0f} to train_tiny.py)")
    save_folder(model, processor, args.output, "5GB")
    print(f"wrote {args.output} (parts in {parts})")


if __name__ == "__main__":
    main()
