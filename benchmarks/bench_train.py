"""Training step throughput (samples/s) and peak memory per step (random weights, synthetic batches).

Each sample: one image, a 3-target GSVA question/answer (one target rejected), rectangle masks. Steps are full
optimizer steps (forward, backward, AdamW) with the chosen recipe.

CPU, tiny preset, as the embedded default trains it:  python benchmarks/bench_train.py --recipe full
CPU, tiny preset, GSVA's LoRA recipe:                python benchmarks/bench_train.py --recipe lora
GPU, GSVA-7B shapes, LoRA + bf16 + checkpointing:     python benchmarks/bench_train.py --preset configs/gsva-7b \
                                                         --device cuda --dtype bf16 --gradient-checkpointing --batch-size 4
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import PeakMemory, preset_processor  # noqa: E402
from configuration_gsva import GSVAConfig  # noqa: E402
from gsva_hf.cpu_memory import MALLOC_CHOICES, apply_malloc_choice  # noqa: E402
from gsva_hf.data.collator import GSVACollator  # noqa: E402
from gsva_hf.data.prompts import multi_target_answer, multi_target_question  # noqa: E402
from gsva_hf.data.sample import Sample  # noqa: E402
from gsva_hf.training import prepare_for_training  # noqa: E402
from modeling_gsva import GSVAForCausalLM  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RECIPES = {
    "lora": dict(lora_r=8),
    "full": dict(lora_r=-1, train_vision_tower=True, train_projector=True, train_sam_encoder=True, train_prompt_encoder=True),
}


def synthetic_samples(count: int, size: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    names = ["the red circle", "the blue square", "the green star"]
    samples = []
    for _ in range(count):
        height, width = size, size * 4 // 3
        masks = np.zeros((3, height, width), bool)
        masks[0, : height // 2, : width // 2] = True
        masks[2, height // 2 :, width // 2 :] = True
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        rejected = [False, True, False]
        rounds = [(multi_target_question(names, style=3), multi_target_answer(names, rejected, style=1))]
        samples.append(Sample(image=image, rounds=rounds, masks=masks, targets=names, rejected=rejected))
    return samples


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", type=Path, default=ROOT / "configs" / "gsva-tiny")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="lora")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="bf16: weights in bf16 (GPU)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--cpu-malloc", choices=MALLOC_CHOICES, default="keep", help="as train_hf.py --cpu_malloc")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    apply_malloc_choice(args.cpu_malloc, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    config = GSVAConfig.from_pretrained(args.preset)
    processor = preset_processor(args.preset, config)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = GSVAForCausalLM._from_config(config, attn_implementation=args.attn, dtype=DTYPES[args.dtype])
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    trainable = prepare_for_training(model, **RECIPES[args.recipe]).train()
    parameters = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)
    collator = GSVACollator(processor)
    batches = [collator(synthetic_samples(args.batch_size, args.image_size, seed)) for seed in range(4)]

    def step(batch):
        inputs = {k: v.to(args.device) if hasattr(v, "to") else v for k, v in batch.items()}
        inputs["gt_masks"] = [m.to(args.device) for m in batch["gt_masks"]]
        loss = trainable(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[:2]:
        step(batch)
    with PeakMemory(args.device) as memory:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for index in range(args.steps):
            step(batches[index % len(batches)])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    row = {
        "preset": args.preset.name,
        "recipe": args.recipe,
        "device": args.device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "threads": torch.get_num_threads(),
        "trainable_parameters": sum(p.numel() for p in parameters),
        "samples_per_s": args.batch_size * args.steps / seconds,
        "seconds_per_step": seconds / args.steps,
        "peak_mib": memory.peak_mib,
    }
    print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(row, indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
