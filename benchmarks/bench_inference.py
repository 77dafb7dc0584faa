"""Inference throughput and peak memory of `GSVAForCausalLM.segment` (random weights).

Two modes: `targets` (`segment(targets=phrases)`: the answer template is fixed, the model decides each slot) and
`generate` (free generation of the same answer, forced with `ForceAnswers` so every run generates the same tokens
and the number of targets is controlled). Reports images/s end to end, and the mask stage alone (SAM encoder
once per image + mask decoder for all targets) per image, for each mode, attention implementation, batch size
and target count.

CPU, tiny preset:      python benchmarks/bench_inference.py
GPU, GSVA-7B shapes:   python benchmarks/bench_inference.py --preset configs/gsva-7b --device cuda --dtype bf16 \
                           --batch-sizes 1,8 --image-size 480
Free generation's cache: ... --modes generate --caches dynamic,static,static-compiled (static-compiled: CUDA only)
Mask stage only, GSVA-7B's SAM ViT-H at 1024 px (the LLM and CLIP cut to one layer: not part of the stage):
                       python benchmarks/bench_inference.py --preset configs/gsva-7b --mask-stage-only
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessorList

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import PeakMemory, preset_processor, timed  # noqa: E402
from configuration_gsva import GSVAConfig  # noqa: E402
from gsva_hf.data.prompts import multi_target_answer  # noqa: E402
from gsva_hf.forced_answers import ForceAnswers, answer_token_ids  # noqa: E402
from gsva_hf.loading import DTYPES  # noqa: E402
from modeling_gsva import GSVAForCausalLM  # noqa: E402


def build(preset: Path, attn: str, device: str, dtype: torch.dtype, mask_stage_only: bool = False):
    config = GSVAConfig.from_pretrained(preset)
    if mask_stage_only:
        config.text_config.num_hidden_layers = 1
        config.vision_config.num_hidden_layers = 1
    torch.manual_seed(0)
    with torch.device(device):
        model = GSVAForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype).eval()
    return model, preset_processor(preset, config)


# Free generation's KV cache: transformers' dynamic cache, a static one (torch.compile off), or a static one with
# generate's own torch.compile of the decoding step (transformers does that on CUDA only).
CACHES = {
    "dynamic": {},
    "static": {"cache_implementation": "static", "disable_compile": True},
    "static-compiled": {"cache_implementation": "static"},
}


def run_case(
    model, processor, mode: str, batch: int, targets: int, image_size: int, repeats: int, device: str, cache: str
) -> dict:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (image_size, image_size * 4 // 3, 3), dtype=np.uint8) for _ in range(batch)]
    names = [f"the shape number {i}" for i in range(targets)]
    answer = multi_target_answer(names, [False] * targets, style=1)
    forced_ids = [answer_token_ids(processor, answer)] * batch
    question = processor.targets_question(names)
    prompt_length = processor(images=images[:1], text=[question])["input_ids"].shape[1]
    forced = LogitsProcessorList([ForceAnswers(forced_ids, prompt_length, model.generation_config.eos_token_id)])

    def segment():
        if mode == "targets":
            return model.segment(processor, images, targets=names, batch_size=batch)
        return model.segment(
            processor,
            images,
            text=question,
            logits_processor=forced,
            max_new_tokens=len(forced_ids[0]) + 2,
            batch_size=batch,
            **CACHES[cache],
        )

    graphs_before = _compiled_graphs()
    with PeakMemory(device) as memory:
        seconds = timed(segment, repeats, device)
    compiled = _compiled_graphs() - graphs_before
    results = segment()
    assert all(len(r.targets) == targets for r in results), "forced answers did not yield the requested targets"

    inputs = processor(images=images, text=[question] * batch).to(device)
    states = torch.randn(targets, model.config.text_config.hidden_size, device=device, dtype=model.dtype).expand(batch, -1, -1)
    slots = torch.ones(states.shape[:2], dtype=torch.bool, device=device)

    def mask_stage():
        embeddings = model.get_sam_image_embeddings(inputs["sam_pixel_values"])
        low_res, _ = model.masks_from_hidden_states(states, embeddings, slots)
        processor.post_process_masks(low_res, inputs["original_sizes"], inputs["reshaped_input_sizes"])

    with torch.no_grad():
        mask_seconds = timed(mask_stage, repeats, device)
    return {
        "batch": batch,
        "targets": targets,
        "cache": cache,
        "compiled_graphs": compiled,
        "images_per_s": batch / seconds,
        "seconds_per_batch": seconds,
        "mask_stage_ms_per_image": 1000 * mask_seconds / batch,
        "peak_mib": memory.peak_mib,
    }


def _compiled_graphs() -> int:
    """Graphs torch.compile has built so far in this process (0 where dynamo never ran)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def mask_stage_case(model, processor, targets: list[int], image_size: int, repeats: int, device: str) -> list[dict]:
    """SAM's encoder once per image, then the decoder for all targets: the stage's cost split into its two calls."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (image_size, image_size * 4 // 3, 3), dtype=np.uint8)
    inputs = processor(images=[image], text=["x"]).to(device)
    embeddings = model.get_sam_image_embeddings(inputs["sam_pixel_values"])
    encoder_seconds = timed(lambda: model.get_sam_image_embeddings(inputs["sam_pixel_values"]), repeats, device)
    rows = []
    for count in targets:
        states = torch.randn(1, count, model.config.text_config.hidden_size, device=device, dtype=model.dtype)
        slots = torch.ones(states.shape[:2], dtype=torch.bool, device=device)

        def decode_and_post_process():
            low_res, _ = model.masks_from_hidden_states(states, embeddings, slots)
            processor.post_process_masks(low_res, inputs["original_sizes"], inputs["reshaped_input_sizes"])

        decoder_seconds = timed(decode_and_post_process, repeats, device)
        rows.append(
            {
                "targets": count,
                "encoder_ms": 1000 * encoder_seconds,
                "decoder_ms": 1000 * decoder_seconds,
                "mask_stage_ms": 1000 * (encoder_seconds + decoder_seconds),
            }
        )
    for row in rows:
        row["relative_to_1_target"] = row["mask_stage_ms"] / rows[0]["mask_stage_ms"]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", type=Path, default=ROOT / "configs" / "gsva-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--attn", default="eager,sdpa")
    parser.add_argument("--modes", default="targets,generate", help="segment(targets=...) and/or forced free generation")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--targets", default="1,3,5")
    parser.add_argument("--image-size", type=int, default=240, help="image height (width is 4/3 of it)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--caches",
        default="dynamic",
        help=f"free generation's KV cache, comma-separated: {', '.join(CACHES)} (static-compiled: CUDA only)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: leave as is)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument(
        "--mask-stage-only", action="store_true", help="time SAM's encoder and the decoder per target count, batch 1"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    rows = []
    if args.mask_stage_only:
        model, processor = build(args.preset, "sdpa", args.device, DTYPES[args.dtype], mask_stage_only=True)
        counts = [int(t) for t in args.targets.split(",")]
        with torch.no_grad():
            rows = mask_stage_case(model, processor, counts, args.image_size, args.repeats, args.device)
        print("| targets | SAM encoder ms | decoder ms | mask stage ms | vs 1 target |")
        print("|---|---|---|---|---|")
        for row in rows:
            print(
                f"| {row['targets']} | {row['encoder_ms']:.1f} | {row['decoder_ms']:.1f} | {row['mask_stage_ms']:.1f} | "
                f"{row['relative_to_1_target']:.3f} |"
            )
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n")
        return
    caches = args.caches.split(",")
    unknown = [cache for cache in caches if cache not in CACHES]
    if unknown:
        parser.error(f"--caches: unknown {', '.join(unknown)}; choose from {', '.join(CACHES)}")
    if "static-compiled" in caches and not args.device.startswith("cuda"):
        parser.error("--caches static-compiled: transformers' generate compiles the decoding step on CUDA only")
    print("| mode | attn | cache | batch | targets | images/s | s/batch | mask stage ms/image | peak MiB | compiled graphs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for attn in args.attn.split(","):
        model, processor = build(args.preset, attn, args.device, DTYPES[args.dtype])
        for mode in args.modes.split(","):
            # Target mode runs its own passes on a dynamic cache; the cache choice is free generation's.
            for cache in caches if mode == "generate" else ["dynamic"]:
                for batch in (int(b) for b in args.batch_sizes.split(",")):
                    for targets in (int(t) for t in args.targets.split(",")):
                        case = (mode, batch, targets, args.image_size, args.repeats, args.device, cache)
                        row = {"mode": mode, "attn": attn, **run_case(model, processor, *case)}
                        rows.append(row)
                        print(
                            f"| {mode} | {attn} | {cache} | {batch} | {targets} | {row['images_per_s']:.2f} | "
                            f"{row['seconds_per_batch']:.3f} | {row['mask_stage_ms_per_image']:.1f} | "
                            f"{row['peak_mib']:.0f} | {row['compiled_graphs']} |",
                            flush=True,
                        )
        del model
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
