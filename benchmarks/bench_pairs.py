"""Target-mode inference and training steps of each pair preset's composed GSVA, random weights, time and memory.

    python benchmarks/bench_pairs.py --preset qwen2.5-vl-3b+sam2.1-hiera-l --device cuda --json out.json
    python benchmarks/bench_pairs.py --preset qwen2.5-vl-3b+sam2.1-hiera-l,qwen3-vl-4b+sam2.1-hiera-b+ --scale tiny

Each preset of `gsva_hf.pair_presets` is built on the device at its real size (`--scale real`) or with every size
shrunk (`--scale tiny`: one text and one vision layer, small widths and vocabulary, 64 px images, the tiny parts of
`gsva_hf.tiny_parts`; seconds on a CPU). No weights are loaded (none can be downloaded): the rows measure time and
memory, never quality. The text side is the tiny BPE of the VLM's family (`tiny_tokenizer`) with `[SEG]`/`[REJ]`
added, its ids written into the VLM config; at real scale the vocabulary keeps the preset's size, so embeddings, LM
head and logits cost what they would. Images are random,
at the preset's VLM size (Qwen 448 px, SmolVLM2 768 px, GSVA-7B 224 px) and SAM's 1024 px, 3 target phrases each.

1. Target mode (`decide_targets`): seconds per image, the median of `--repeats` (5) batches after a warm-up; peak
   memory.
2. Training steps (forward with labels and ground-truth masks, backward, AdamW): GSVA's freezing (vision tower and
   projector, the mask decoder's image and prompt encoders frozen; language model, LM head, embeddings, mask decoder
   and `text_hidden_fcs` trained fully, not LoRA, as `pair_counts`' "frozen" activations); seconds per step (median
   after a warm-up step) and peak memory (weights, gradients, AdamW states, activations). `--checkpointing` turns on
   activation checkpointing.

GPU memory is `torch.cuda.max_memory_allocated`; CPU memory the peak resident set of the process. The preset
`gsva-7b` is the original layout (LLaVA v1 + SAM ViT-H) with the benchmarks' stand-in tokenizer, for comparison.
EdgeTAM's image encoder is a timm model: without timm its row is reported as skipped.
"""

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import Qwen2VLImageProcessorPil, SmolVLMImageProcessorPil, ViTImageProcessorPil
from transformers.utils import is_timm_available

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import PeakMemory, preset_processor  # noqa: E402
from configuration_gsva import GSVAConfig  # noqa: E402
from gsva_hf import pair_presets, tiny_parts  # noqa: E402
from gsva_hf.compose import add_slot_tokens, image_seq_length  # noqa: E402
from gsva_hf.training import prepare_for_training  # noqa: E402
from modeling_gsva import GSVAForCausalLM  # noqa: E402
from processing_gsva import REJ_TOKEN, SEG_TOKEN, GSVAProcessor, eval_answer, target_phrase  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGETS = ["the red car on the left", "a dog", "the man in the blue shirt"]
REJECTED = [False, True, False]  # the training answers: [SEG], [REJ], [SEG]
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
TINY_IMAGE_SIZE = 64  # tiny scale: every VLM image processor of `tiny_parts` reads a 64 px image
TINY_GSVA = ROOT / "configs" / "gsva-tiny"
# Config fields naming a token, per VLM family, and the tokenizer attribute (or token) holding its id.
TOKEN_FIELDS = {
    "qwen2_5_vl": {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    },
    "qwen3_vl": {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    },
    "smolvlm": {"image_token_id": "<image>"},
}


class BenchError(ValueError):
    """A preset or option this benchmark cannot run, named with what is expected."""


# ---------------------------------------------------------------- building one preset


def token_fields(family: str, tokenizer) -> dict[str, int]:
    """The VLM config's token-id fields and their ids in `tokenizer` (the family's special tokens)."""
    return {field: tokenizer.convert_tokens_to_ids(token) for field, token in TOKEN_FIELDS[family].items()}


def text_token_fields(tokenizer) -> dict[str, int | None]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def tiny_vlm_config(family: str):
    """`tiny_parts`' config of `family` cut to one text layer and one vision layer."""
    config = tiny_parts.tiny_vlm_config(family)
    text, vision = config.get_text_config(), config.vision_config
    text.num_hidden_layers = 1
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:1]
    if family == "qwen2_5_vl":
        vision.depth, vision.fullatt_block_indexes = 1, [0]
    elif family == "qwen3_vl":
        vision.depth, vision.deepstack_visual_indexes = 1, [0]
    else:
        vision.num_hidden_layers = 1
    return config


def composed_vlm_config(name: str, scale: str, tokenizer):
    """The preset's VLM config (`scale` "real") or the family's tiny one, its token ids replaced by `tokenizer`'s."""
    real = pair_presets.vlm_config(name)
    family = real.model_type
    config = real if scale == "real" else tiny_vlm_config(family)
    text = config.get_text_config()
    # Real: the preset's vocabulary (embeddings, LM head and logits cost what they would); tiny: the tokenizer's.
    text.vocab_size = real.get_text_config().vocab_size if scale == "real" else -(-len(tokenizer) // 64) * 64
    if len(tokenizer) > text.vocab_size:
        raise BenchError(
            f"--preset {name}: the tokenizer's {len(tokenizer)} tokens exceed the vocabulary {text.vocab_size}"
        )
    for field, value in token_fields(family, tokenizer).items():
        setattr(config, field, value)
    for field, value in text_token_fields(tokenizer).items():
        setattr(text, field, value)
    if family == "smolvlm":
        config.pad_token_id = tokenizer.pad_token_id
    config._attn_implementation = "sdpa"
    return config


def composed_mask_config(name: str, scale: str):
    """The preset's SAM-family config (real), or the family's tiny one; one mask per `[SEG]` (no multimask swap)."""
    family = pair_presets.preset(name)["mask_decoder"]["model_type"]
    config = pair_presets.mask_config(name) if scale == "real" else tiny_parts.tiny_mask_decoder_config(family)
    if family in ("sam2", "edgetam"):
        config.mask_decoder_config.dynamic_multimask_via_stability = False
    return config


def vlm_image_processor(name: str, scale: str):
    """The family's image processor (PIL class) at the preset's image size, or `tiny_parts`' tiny one."""
    entry, config = pair_presets.preset(name), pair_presets.vlm_config(name)
    family = config.model_type
    if scale == "tiny":
        return tiny_parts.tiny_image_processor(family)
    side, vision = entry["vlm_image_size"], config.vision_config
    if family in ("qwen2_5_vl", "qwen3_vl"):
        # min = max pixels: a square image of `side` px (a multiple of patch x merge) keeps its size.
        mean, std = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) if family == "qwen2_5_vl" else ([0.5] * 3, [0.5] * 3)
        return Qwen2VLImageProcessorPil(
            size={"shortest_edge": side * side, "longest_edge": side * side},
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
            image_mean=mean,
            image_std=std,
        )
    if family == "smolvlm":
        return SmolVLMImageProcessorPil(
            size={"longest_edge": side},
            max_image_size={"longest_edge": vision.image_size},
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
    raise BenchError(f"--preset {name}: no image processor rule for VLM family {family!r}")


def mask_image_processor(side: int) -> ViTImageProcessorPil:
    """SAM 2 / EdgeTAM's square resize as `gsva-compose` writes it without torchvision."""
    return ViTImageProcessorPil(
        size={"height": side, "width": side},
        image_mean=tiny_parts.IMAGENET_MEAN,
        image_std=tiny_parts.IMAGENET_STD,
        rescale_factor=1 / 255,
        resample=2,
    )


def composed_parts(name: str, scale: str) -> tuple[GSVAConfig, GSVAProcessor]:
    """The composed preset's GSVAConfig and processor (tokenizer, chat template, image processors)."""
    family = pair_presets.vlm_config(name).model_type
    tokenizer = tiny_parts.tiny_tokenizer(family)
    ids = add_slot_tokens(tokenizer)
    vlm = composed_vlm_config(name, scale, tokenizer)
    sam = composed_mask_config(name, scale)
    config = GSVAConfig(
        vlm_config=vlm,
        sam_config=sam,
        image_token_id=vlm.image_token_id,
        im_start_token_id=None,
        im_end_token_id=None,
        seg_token_id=ids[SEG_TOKEN],
        rej_token_id=ids[REJ_TOKEN],
        out_dim=sam.prompt_encoder_config.hidden_size,
    )
    processor = GSVAProcessor(
        vlm_image_processor(name, scale),
        mask_image_processor(sam.prompt_encoder_config.image_size),
        tokenizer,
        chat_template=tiny_parts.chat_template(family),
        backbone=family,
        image_token=tokenizer.convert_ids_to_tokens(vlm.image_token_id),
        image_seq_length=image_seq_length(vlm),
    )
    processor.check_config(config)
    return config, processor


def gsva_parts(scale: str) -> tuple[GSVAConfig, GSVAProcessor]:
    """GSVA-7B (LLaVA v1 + SAM ViT-H) with the benchmarks' stand-in tokenizer, or the bundled tiny preset."""
    if scale == "tiny":
        config = GSVAConfig.from_pretrained(TINY_GSVA)
        return config, preset_processor(TINY_GSVA, config)
    config = pair_presets.vlm_config("gsva-7b")
    return config, preset_processor(ROOT / "configs" / "gsva-7b", config)


def image_side(name: str, scale: str) -> int:
    if scale == "tiny":
        return GSVAConfig.from_pretrained(TINY_GSVA).vision_config.image_size if name == "gsva-7b" else TINY_IMAGE_SIZE
    return pair_presets.preset(name)["vlm_image_size"]


def skip_reason(name: str) -> str | None:
    if pair_presets.preset(name)["mask_decoder"]["model_type"] == "edgetam" and not is_timm_available():
        return "EdgeTAM's image encoder is a timm RepViT and timm is not importable here"
    return None


def build(name: str, scale: str, device: str, dtype: torch.dtype):
    """(model, processor) of preset `name`, random weights drawn on `device` in `dtype`, in eval mode."""
    config, processor = gsva_parts(scale) if name == "gsva-7b" else composed_parts(name, scale)
    torch.manual_seed(0)
    with torch.device(device):
        model = GSVAForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval(), processor


# ---------------------------------------------------------------- inputs


def random_images(count: int, side: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def to_device(batch, device: str, dtype: torch.dtype) -> dict:
    """Tensors on `device`, floating ones in the model's dtype; the processor's sizes stay as they are."""
    moved = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device, dtype=dtype) if value.is_floating_point() else value.to(device)
        moved[key] = value
    return moved


def training_batch(processor, images, device: str, dtype: torch.dtype) -> dict:
    """GSVA's target question and an answer with `[SEG]`, `[REJ]`, `[SEG]` per image; a rectangle per `[SEG]` as its
    ground truth at the image's size, an empty mask for the `[REJ]`."""
    question, _ = processor.targets_conversation(TARGETS)
    answer = eval_answer([target_phrase(t) for t in TARGETS], REJECTED)
    batch = to_device(processor(images=images, conversations=[[(question, answer)]] * len(images)), device, dtype)
    gt_masks = []
    for image in images:
        masks = torch.zeros(len(TARGETS), image.height, image.width, device=device)
        for slot, rejected in enumerate(REJECTED):
            if not rejected:
                masks[
                    slot, slot * image.height // 4 : image.height // 2 + slot * image.height // 4, : image.width // 2
                ] = 1
        gt_masks.append(masks)
    batch["gt_masks"] = gt_masks
    return batch


# ---------------------------------------------------------------- measuring


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(function, repeats: int, device: str) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_inference(model, inputs: dict, batch: int, device: str, repeats: int) -> dict:
    with torch.inference_mode(), PeakMemory(device) as memory:
        seconds = median_seconds(lambda: model.decide_targets(**inputs), repeats, device)
    return {"target_mode_s_per_image": seconds / batch, "target_mode_peak_mib": memory.peak_mib}


def measure_training(model, batch: dict, steps: int, device: str, checkpointing: bool) -> dict:
    """Warm-up step (AdamW's states appear there), then `steps` timed steps; the peak covers all of them."""
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    trainable = prepare_for_training(model, lora_r=-1).train()
    parameters = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, weight_decay=0.0)
    losses = []

    def step():
        loss = trainable(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        losses.append(value if math.isfinite(value) else None)  # JSON has no NaN; None marks a non-finite loss

    with PeakMemory(device) as memory:
        seconds = median_seconds(step, steps, device)
    return {
        "train_s_per_step": seconds,
        "train_peak_mib": memory.peak_mib,
        "trainable_parameters": sum(p.numel() for p in parameters),
        "losses": losses,
    }


def run_preset(name: str, args) -> dict:
    """One row: the build, target mode and training of preset `name`; a phase out of memory is named, not raised."""
    row = {"preset": name, "scale": args.scale, "device": args.device, "dtype": args.dtype, "batch": args.batch}
    row["checkpointing"] = args.checkpointing
    reason = skip_reason(name)
    if reason:
        return {**row, "skipped": reason}
    dtype = DTYPES[args.dtype]
    start = time.perf_counter()
    model, processor = build(name, args.scale, args.device, dtype)
    synchronize(args.device)
    row["build_s"] = time.perf_counter() - start
    row["parameters"] = sum(p.numel() for p in model.parameters())
    if args.device.startswith("cuda"):
        row["weights_mib"] = torch.cuda.memory_allocated() / 2**20
    images = random_images(args.batch, image_side(name, args.scale))
    row["image_px"] = images[0].width
    row["mask_px"] = int(processor(images=images[:1], targets=[TARGETS])["sam_pixel_values"].shape[-1])
    inputs = to_device(processor(images=images, targets=[TARGETS] * args.batch), args.device, dtype)
    row["prompt_tokens"] = int(inputs["attention_mask"][0].sum())
    row["config_token_ids"] = {"image_token_id": model.config.image_token_id, "seg_token_id": model.config.seg_token_id,
                               "rej_token_id": model.config.rej_token_id}  # fmt: skip
    phases = {
        "target_mode": (measure_inference, (inputs, args.batch, args.device, args.repeats)),
        "train": (measure_training, (training_batch(processor, images, args.device, dtype), args.steps, args.device,
                                     args.checkpointing)),
    }  # fmt: skip
    for phase, (measure, measure_args) in phases.items():
        try:
            row.update(measure(model, *measure_args))
        except torch.OutOfMemoryError as error:
            row[f"{phase}_error"] = f"out of memory: {str(error).splitlines()[0][:200]}"
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------- report

HEADER = (
    "| pair | scale | device | dtype | batch | image px | prompt tokens | params (M) | target mode ms / image "
    "| target mode peak (GiB) | train s / step | train peak (GiB) | checkpointing | note |"
)


def markdown_row(row: dict) -> str:
    def number(key, scale=1.0, digits=2):
        value = row.get(key)
        return "n/a" if value is None else f"{value * scale:.{digits}f}"

    notes = [row[k] for k in ("skipped", "target_mode_error", "train_error") if row.get(k)]
    cells = [
        row["preset"], row["scale"], row["device"], row["dtype"], str(row["batch"]), str(row.get("image_px", "n/a")),
        str(row.get("prompt_tokens", "n/a")), number("parameters", 1e-6, 1), number("target_mode_s_per_image", 1e3, 1),
        number("target_mode_peak_mib", 1 / 1024), number("train_s_per_step", 1, 3), number("train_peak_mib", 1 / 1024),
        "yes" if row["checkpointing"] else "no", "; ".join(notes),
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    from benchmarks.bench_mask_stage import cpu_name

    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:5]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--preset", required=True, help=f"pair presets, comma-separated: {', '.join(pair_presets.PAIR_PRESETS)}"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the weights")
    parser.add_argument("--scale", choices=["real", "tiny"], default="real", help="real sizes, or tiny (CPU, seconds)")
    parser.add_argument("--batch", type=int, default=4, help="images per batch, 3 target phrases each")
    parser.add_argument("--repeats", type=int, default=5, help="timed target-mode batches after a warm-up")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps after a warm-up step")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the training steps")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as it is)")
    parser.add_argument("--json", type=Path, help="write the rows, device, versions and command here")
    return parser


def main(argv=None) -> list[dict]:
    """Run every preset named; print the table, write the JSON; returns the rows."""
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.preset.split(",") if name.strip()]
    unknown = [name for name in names if name not in pair_presets.PAIR_PRESETS]
    if unknown or not names:
        parser.error(f"--preset: expected names among {', '.join(pair_presets.PAIR_PRESETS)}, got {args.preset!r}")
    if min(args.batch, args.steps, args.repeats) < 1 or args.threads < 0:
        parser.error("--batch, --steps and --repeats: expected positive integers; --threads: a non-negative integer")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for name in names:
        rows.append(run_preset(name, args))
        print(markdown_row(rows[-1]), flush=True)
    command = "python benchmarks/bench_pairs.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    report = {
        "device_name": device_name(args.device),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "cuda": torch.version.cuda,
        },  # fmt: skip
        "command": command,
        "rows": rows,
    }
    print(
        f"{report['device_name']}; torch {torch.__version__}, transformers {transformers.__version__}; random weights"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return rows


if __name__ == "__main__":
    main()
