"""CPU cost per image of the mask stage of each SAM-family decoder: the image encoder once, then one decoder call with
`--prompts` custom sparse prompts (GSVA's `[SEG]` embeddings), fp32, random weights.

The models are timed in turn within each repeat, so machine noise hits all of them alike; the table gives the median
of the repeats after a warm-up, and each model's cost relative to SAM measured in the same run.

Tiny presets (256 px, the ones the tests use):   python benchmarks/bench_mask_stage.py
Released sizes (SAM / SAM-HQ ViT-B, SAM 2.1 Hiera-T and B+ at 1024 px; slow: one image each):
                                                 python benchmarks/bench_mask_stage.py --size real
"""

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModel
from transformers.utils import is_timm_available

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gsva_hf.presets import sam_config  # noqa: E402
from gsva_hf.tiny_parts import (  # noqa: E402
    MASK_DECODER_FAMILIES,
    decode_mask_prompts,
    mask_image_features,
    tiny_mask_decoder_config,
)


def hiera_config(size: str) -> dict:
    """`Sam2Config` kwargs for SAM 2.1 Hiera-T / B+ (the `sam2.1_hiera_{t,b+}.yaml` sizes in backbones.md B.4)."""
    width, heads, blocks, global_blocks, background = {
        "t": (96, 1, [1, 2, 7, 2], [5, 7, 9], [7, 7]),
        "b+": (112, 2, [2, 3, 16, 3], [12, 16, 20], [14, 14]),
    }[size]
    dims = [width * 2**stage for stage in range(4)]
    backbone = dict(
        model_type="sam2_hiera_det_model",
        hidden_size=width,
        num_attention_heads=heads,
        blocks_per_stage=blocks,
        embed_dim_per_stage=dims,
        num_attention_heads_per_stage=[heads * 2**stage for stage in range(4)],
        global_attention_blocks=global_blocks,
        window_positional_embedding_background_size=background,
    )
    vision = dict(backbone_config=backbone, backbone_channel_list=dims[::-1])
    return {"vision_config": vision, "mask_decoder_config": {"dynamic_multimask_via_stability": False}}


def real_configs() -> dict:
    """Released-size configs (random weights); SAM first, the reference of the ratios."""
    sam = sam_config("vit_b")
    hq = {**sam, "mask_decoder_config": {**sam["mask_decoder_config"], "vit_dim": sam["vision_config"]["hidden_size"]}}
    return {
        "SAM ViT-B": AutoConfig.for_model("sam", **sam),
        "SAM-HQ ViT-B": AutoConfig.for_model("sam_hq", **hq),
        "SAM 2.1 Hiera-T": AutoConfig.for_model("sam2", **hiera_config("t")),
        "SAM 2.1 Hiera-B+": AutoConfig.for_model("sam2", **hiera_config("b+")),
    }


def tiny_configs() -> dict:
    """The tiny presets of `gsva_hf.tiny_parts` (EdgeTAM only when timm imports); SAM first."""
    families = [family for family in MASK_DECODER_FAMILIES if family != "edgetam" or is_timm_available()]
    return {f"tiny {family}": tiny_mask_decoder_config(family) for family in families}


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def millions(module) -> float:
    return sum(parameter.numel() for parameter in module.parameters()) / 1e6


def time_models(models: dict, prompts: int, repeats: int) -> dict:
    """Median encoder and decoder seconds per model for one image, the models interleaved within each repeat."""
    times = {name: {"encoder": [], "decoder": [], "total": []} for name in models}
    for repeat in range(repeats + 1):
        for name, model in models.items():
            side = model.config.prompt_encoder_config.image_size
            generator = torch.Generator().manual_seed(repeat)
            pixel_values = torch.randn(1, 3, side, side, generator=generator)
            embeddings = torch.randn(1, prompts, model.config.prompt_encoder_config.hidden_size, generator=generator)
            start = time.perf_counter()
            features = mask_image_features(model, pixel_values)
            middle = time.perf_counter()
            decode_mask_prompts(model, features, embeddings)
            end = time.perf_counter()
            if repeat == 0:  # warm-up
                continue
            times[name]["encoder"].append(middle - start)
            times[name]["decoder"].append(end - middle)
            times[name]["total"].append(end - start)
    return {name: {part: statistics.median(values) for part, values in parts.items()} for name, parts in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "real"], default="tiny", help="tiny presets or released sizes")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, help="timed runs per model after a warm-up (default 20; --size real: 1)")
    parser.add_argument("--prompts", type=int, default=3, help="sparse prompts in the one decoder call")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (20 if args.size == "tiny" else 1)
    if args.threads < 1 or repeats < 1 or args.prompts < 1:
        parser.error("--threads, --repeats and --prompts: expected positive integers")
    torch.set_num_threads(args.threads)
    configs = tiny_configs() if args.size == "tiny" else real_configs()
    if args.size == "real":
        print(
            "--size real: 1024 px models on the CPU, a warm-up and one timed image each; this takes minutes",
            file=sys.stderr,
        )
    torch.manual_seed(0)
    models = {name: AutoModel.from_config(config).eval() for name, config in configs.items()}
    with torch.inference_mode():
        medians = time_models(models, args.prompts, repeats)
    reference = medians[next(iter(medians))]
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {cpu_name()}, "
        f"{args.threads} threads, fp32, 1 image, {args.prompts} prompts, "
        f"median of {repeats} after a warm-up; ratios to {next(iter(medians))}\n"
    )
    print("| model | input px | encoder M params | decoder M params | encoder ms | decoder ms | total ms "
          "| encoder / SAM | decoder / SAM | total / SAM |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, model in models.items():
        row = medians[name]
        ratios = " | ".join(f"{row[part] / reference[part]:.2f}" for part in ("encoder", "decoder", "total"))
        encoder = millions(model) - millions(model.mask_decoder) - millions(model.prompt_encoder)
        print(
            f"| {name} | {model.config.prompt_encoder_config.image_size} | {encoder:.3f} | "
            f"{millions(model.mask_decoder):.3f} | {row['encoder'] * 1e3:.2f} | {row['decoder'] * 1e3:.2f} | "
            f"{row['total'] * 1e3:.2f} | {ratios} |"
        )


if __name__ == "__main__":
    main()
