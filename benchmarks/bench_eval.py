"""Teacher-forced evaluation speed and peak memory: `score_teacher_forced` against the two-full-pass reference.

Evaluation loop (default): `gsva_hf.evaluation.evaluate_dataset` over a synthetic gRefCOCO-layout split, each
variant in its own process (alternating, `--repeats` times, under each `--cpu-malloc` setting) so that peak RSS,
system time and page faults are the whole process's; the variants' metrics and decisions are checked to agree.
`--stages` prints where one run's seconds go. `--reference-batch-size 1` runs the reference at GSVA's only
evaluation batch size (its `main.py` asserts 1).

    python benchmarks/bench_eval.py                              # bundled tiny model, 40 images, 1 thread
    python benchmarks/bench_eval.py --stages                     # the per-stage table of one run
    python benchmarks/bench_eval.py --worker reference --cpu-malloc keep --data DATA   # one process, one variant
    python benchmarks/bench_eval.py --paired --cpu-malloc keep --repeats 15 --reference-batch-size 1
                                                                 # both in one process, per-round ratios

Prepared batches (`--prepared`): a preset with random weights, random images with `--targets` expressions each
(a quarter `[REJ]`), `score_teacher_forced` images/s and peak memory per batch size, attention and variant, and
`--target-mode` also times `segment(processor, images, targets=...)`, `--stages` splits one call into its stages
and `--layers N` keeps the preset's widths with N blocks in the LLM, CLIP and SAM's encoder:

    python benchmarks/bench_eval.py --prepared --preset configs/gsva-7b --device cuda --dtype bf16 \
        --image-size 480 --targets 10 --batch-sizes 1,8,16 --attn sdpa,flash_attention_2 --target-mode

Saved and reloaded (`--load-ins`): the same timing after `load_gsva`, e.g. with the LLM in 4-bit (bitsandbytes):

    python benchmarks/bench_eval.py --load-ins 4bit,none --preset configs/gsva-7b --device cuda --dtype bf16 \
        --image-size 480 --targets 10 --batch-sizes 1,8
"""

import argparse
import contextlib
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import reference_eval  # noqa: E402
from benchmarks.common import preset_processor, timed  # noqa: E402
from gsva_hf import teacher_forced  # noqa: E402

VARIANTS = ("current", "reference")


def variant_context(variant: str):
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return reference_eval.reference_evaluation() if variant == "reference" else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------- evaluation loop
def stage_timers(model) -> tuple[dict, Counter, list]:
    """Wrap the loop's stages (data, collation, CLIP, LLM, SAM encoder/decoder, post-processing, metrics)."""
    import processing_gsva
    from gsva_hf.data.collator import GSVACollator
    from gsva_hf.data.refer_seg import ReferSegValDataset
    from gsva_hf.metrics import GresAccumulator

    seconds, calls, restore = defaultdict(float), Counter(), []

    def wrap(owner, name, label, static=False):
        original = owner.__dict__[name]
        function = original.__func__ if static else original

        @functools.wraps(function)
        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - start
                calls[label] += 1

        setattr(owner, name, staticmethod(timed_call) if static else timed_call)
        restore.append((owner, name, original))

    wrap(ReferSegValDataset, "__getitem__", "data: read and decode")
    wrap(GSVACollator, "__call__", "collate: CLIP/SAM pre-processing, tokenising")
    # The base owns the parts; the head delegates to it, so each call is timed once.
    wrap(type(model.model), "get_image_features", "CLIP tower + projector")
    wrap(type(model.get_decoder()), "forward", "LLM decoder (all passes)")
    wrap(type(model.model), "get_sam_image_embeddings", "SAM image encoder")
    wrap(type(model.sam.mask_decoder), "forward", "SAM mask decoder")
    wrap(processing_gsva, "upscale_mask_logits", "mask post-processing")
    wrap(reference_eval, "full_upsample_postprocess", "mask post-processing")
    wrap(GresAccumulator, "add", "metric accumulation")
    return seconds, calls, restore


def loop_setup(args):
    """This process as `eval_hf.py` sets it up: the malloc setting, the threads, the model and the split."""
    from gsva_hf.cpu_memory import apply_malloc_choice
    from gsva_hf.data.mixed import build_val_dataset
    from gsva_hf.loading import load_gsva

    apply_malloc_choice(args.cpu_malloc, "cpu", flag="--cpu-malloc")
    torch.set_num_threads(args.threads)
    model, processor = load_gsva(args.model, dtype=args.dtype, device="cpu")
    return model, processor, build_val_dataset(args.data, args.val_dataset)


def variant_batch_size(args, variant: str) -> int:
    return args.reference_batch_size if variant == "reference" and args.reference_batch_size else args.batch_size


def run_worker(args) -> dict:
    """One variant, one evaluation loop in this process; returns seconds, peak RSS and the results."""
    from gsva_hf.evaluation import evaluate_dataset

    model, processor, dataset = loop_setup(args)
    rss_before = psutil.Process().memory_info().rss / 2**20
    timers = stage_timers(model) if args.stages else None
    with variant_context(args.worker):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        start, cpu_start = time.perf_counter(), time.process_time()
        result = evaluate_dataset(model, processor, dataset, batch_size=args.batch_size, progress=False)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        after = resource.getrusage(resource.RUSAGE_SELF)
    row = {
        "variant": args.worker,
        "cpu_malloc": args.cpu_malloc,
        "batch_size": args.batch_size,
        "loop_s": seconds,
        "loop_cpu_s": cpu_seconds,
        "loop_system_s": after.ru_stime - usage.ru_stime,
        "loop_page_faults": after.ru_minflt - usage.ru_minflt,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_loop_mib": rss_before,
        "images": len(dataset),
        "targets": result.metrics["count"],
        "metrics": result.metrics,
        "decisions": [record["pred_rejected"] for record in result.records],
    }
    if timers is not None:
        stage_seconds, calls, restore = timers
        for owner, name, original in restore:
            setattr(owner, name, original)
        row["stages"] = {label: {"s": s, "calls": calls[label]} for label, s in stage_seconds.items()}
    return row


def worker_command(args, variant: str, malloc: str) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--model", str(args.model)]
    batch = variant_batch_size(args, variant)
    command += ["--data", str(args.data), "--val-dataset", args.val_dataset, "--batch-size", str(batch)]
    command += ["--threads", str(args.threads), "--dtype", args.dtype, "--cpu-malloc", malloc]
    return command + (["--stages"] if args.stages else [])


def spawn(args, variant: str, malloc: str) -> dict:
    env = {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        worker_command(args, variant, malloc), capture_output=True, text=True, env={**os.environ, **env}, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{variant} worker failed (rc {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_stages(row: dict) -> None:
    total = row["loop_s"]
    name = f"{row['variant']} (malloc {row['cpu_malloc']})" if "cpu_malloc" in row else row["variant"]
    print(f"\n{name}: {row['images']} images, {row['targets']} targets, loop {total:.3f} s")
    print("| stage | s | share of the loop | calls |")
    print("|---|---|---|---|")
    for label, stage in row["stages"].items():
        print(f"| {label} | {stage['s']:.3f} | {100 * stage['s'] / total:.1f}% | {stage['calls']} |")
    inside = sum(stage["s"] for stage in row["stages"].values())
    print(
        f"| rest (Python glue, batching, tensors to lists) | {total - inside:.3f} | {100 * (total - inside) / total:.1f}% | |"
    )


def loop_benchmark(args) -> list[dict]:
    run = paired_rounds if args.paired else _loop_benchmark
    if args.data is not None:
        return run(args)
    from gsva_hf.data.synthetic import write_synthetic_grefcoco

    args.data = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    try:
        write_synthetic_grefcoco(
            args.data, num_images={"train": 0, "val": args.val_images, "testA": 0, "testB": 0}, seed=0
        )
        return run(args)
    finally:
        shutil.rmtree(args.data, ignore_errors=True)


def paired_rounds(args) -> list[dict]:
    """One process, the model loaded once, `--repeats` rounds of both variants in alternating order: the per-round
    ratio cancels the slow drifts of a shared machine that separate processes see (peak memory needs those)."""
    from gsva_hf.evaluation import evaluate_dataset

    model, processor, dataset = loop_setup(args)
    sizes = {variant: variant_batch_size(args, variant) for variant in VARIANTS}

    def loop(variant: str) -> tuple[float, dict]:
        with variant_context(variant):
            start = time.perf_counter()
            result = evaluate_dataset(model, processor, dataset, batch_size=sizes[variant], progress=False)
            elapsed = time.perf_counter() - start
        return elapsed, {"metrics": result.metrics, "decisions": [r["pred_rejected"] for r in result.records]}

    first = loop(VARIANTS[0])[1]  # warm-up, and what every later loop must agree with
    seconds = defaultdict(list)
    for round_index in range(args.repeats + 1):
        for variant in VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]:
            elapsed, outcome = loop(variant)
            _check_same_outcome(outcome, first, variant)
            if round_index:
                seconds[variant].append(elapsed)
    ratios = [reference / current for current, reference in zip(seconds["current"], seconds["reference"])]
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    print(
        f"{len(dataset)} images, batch {sizes['current']} (reference: {sizes['reference']}), {args.threads} thread(s), "
        f"malloc {args.cpu_malloc}, {args.repeats} paired rounds in one process"
    )
    print("| variant | loop s median | min | max |")
    print("|---|---|---|---|")
    for variant in VARIANTS:
        runs = seconds[variant]
        print(f"| {variant} | {statistics.median(runs):.3f} | {min(runs):.3f} | {max(runs):.3f} |")
    print(
        f"reference / current per round: median {statistics.median(ratios):.2f}x "
        f"(quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f}, range {min(ratios):.2f}-{max(ratios):.2f}); "
        "metrics within 1e-6 and the same decisions in every loop"
    )
    return [{"variant": v, "batch_size": sizes[v], "loop_s": seconds[v]} for v in VARIANTS] + [{"ratios": ratios}]


def _check_same_outcome(row: dict, first: dict, label: str) -> None:
    if row["decisions"] != first["decisions"]:
        raise AssertionError(f"[REJ] decisions differ: {label} vs the first run")
    worst = max(abs(row["metrics"][k] - first["metrics"][k]) for k in row["metrics"])
    if worst > 1e-6:
        raise AssertionError(f"metrics differ by {worst} ({label}): {row['metrics']} vs {first['metrics']}")


def _loop_benchmark(args) -> list[dict]:
    """Every (variant, malloc) pair runs once per repeat, in turn, each in a fresh process."""
    runs = defaultdict(list)
    for _ in range(args.repeats):
        for malloc in args.cpu_malloc.split(","):
            for variant in args.variants.split(","):
                runs[(variant, malloc)].append(spawn(args, variant, malloc))
    first = [rows[0] for rows in runs.values()]
    for row in first[1:]:
        _check_same_outcome(row, first[0], f"{row['variant']}/{row['cpu_malloc']}")
    summary = {}
    for (variant, malloc), rows in runs.items():
        summary[(variant, malloc)] = {
            "variant": variant,
            "cpu_malloc": malloc,
            "batch_size": rows[0]["batch_size"],
            "loop_s_median": statistics.median(r["loop_s"] for r in rows),
            "loop_s_all": [round(r["loop_s"], 3) for r in rows],
            "loop_cpu_s_median": statistics.median(r["loop_cpu_s"] for r in rows),
            "loop_system_s_median": statistics.median(r["loop_system_s"] for r in rows),
            "loop_page_faults_median": statistics.median(r["loop_page_faults"] for r in rows),
            "peak_rss_mib_median": statistics.median(r["peak_rss_mib"] for r in rows),
            "rss_before_loop_mib_median": statistics.median(r["rss_before_loop_mib"] for r in rows),
            "images": rows[0]["images"],
            "targets": rows[0]["targets"],
            "metrics": rows[0]["metrics"],
        }
    some = next(iter(summary.values()))
    batches = f"batch {args.batch_size}" + (
        f" (reference: {args.reference_batch_size})" if args.reference_batch_size else ""
    )
    print(f"{some['images']} images, {some['targets']} targets, {batches}, {args.threads} thread(s)")
    print(
        "| variant | malloc | evaluation loop s (median) | runs | loop CPU s | of it system s | page faults | "
        "peak RSS MiB | RSS before loop MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in summary.values():
        print(
            f"| {row['variant']} | {row['cpu_malloc']} | {row['loop_s_median']:.3f} | {row['loop_s_all']} | "
            f"{row['loop_cpu_s_median']:.3f} | {row['loop_system_s_median']:.3f} | "
            f"{row['loop_page_faults_median']:.0f} | {row['peak_rss_mib_median']:.0f} | "
            f"{row['rss_before_loop_mib_median']:.0f} |"
        )
    pairs = [(("reference", m), ("current", m), f"malloc {m} for both") for m in args.cpu_malloc.split(",")]
    pairs.append((("reference", "default"), ("current", "keep"), "eval_hf.py's defaults against GSVA's two passes"))
    for before, after, label in pairs:
        if before in summary and after in summary:
            wall, cpu = (summary[before][key] / summary[after][key] for key in ("loop_s_median", "loop_cpu_s_median"))
            print(f"speed-up, {label} (reference / current, medians): wall {wall:.2f}x, CPU {cpu:.2f}x")
    print("metrics within 1e-6 and the same decisions in every run")
    if args.stages:
        for rows in runs.values():
            print_stages(rows[0])
    return list(summary.values())


# ------------------------------------------------------------------------------------------- prepared batches
def prepared_inputs(processor, batch: int, targets: int, image_size: int, device: str, dtype) -> tuple[dict, list]:
    """`batch` random images (image_size x 4/3 of it) with `targets` expressions each, every fourth one `[REJ]`."""
    from processing_gsva import eval_answer, eval_question

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (image_size, image_size * 4 // 3, 3), dtype=np.uint8) for _ in range(batch)]
    names = [f"the shape number {i}" for i in range(targets)]
    rejected = [i % 4 == 1 for i in range(targets)]
    inputs = processor(
        images=images, text=[eval_question(names)] * batch, answers=[eval_answer(names, rejected)] * batch
    )
    inputs = {k: v.to(device) for k, v in inputs.items() if k != "labels"}
    for key in ("pixel_values", "sam_pixel_values"):
        inputs[key] = inputs[key].to(dtype)
    return inputs, images, names


@contextlib.contextmanager
def peak_memory(device: str):
    """Peak CUDA memory allocated in the block (MiB), or this process's peak RSS so far on CPU."""
    box = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield box
    finally:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            box["mib"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            box["mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepared_benchmark(args) -> list[dict]:
    from configuration_gsva import GSVAConfig
    from gsva_hf.loading import DTYPES
    from modeling_gsva import GSVAForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    config = GSVAConfig.from_pretrained(args.preset)
    processor = preset_processor(args.preset, config)
    if args.layers:
        # Same widths, fewer blocks: per-layer costs and the proportions of the stages at a preset's shapes.
        config.text_config.num_hidden_layers = config.vision_config.num_hidden_layers = args.layers
        sam_vision = config.sam_config.vision_config
        sam_vision.num_hidden_layers = args.layers
        sam_vision.global_attn_indexes = [i for i in sam_vision.global_attn_indexes if i < args.layers]
    rows = []
    print("| attn | batch | variant | images/s | s/batch | peak MiB |")
    print("|---|---|---|---|---|---|")
    for attn in args.attn.split(","):
        try:
            torch.manual_seed(0)
            with torch.device(args.device):
                model = GSVAForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype).eval()
        except (ImportError, ValueError) as error:
            print(f"| {attn} | - | - | unavailable: {str(error).splitlines()[0][:100]} | | |", flush=True)
            continue
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            inputs, images, names = prepared_inputs(processor, batch, args.targets, args.image_size, args.device, dtype)
            outputs = {}
            for variant in args.variants.split(","):
                with variant_context(variant), torch.no_grad(), peak_memory(args.device) as memory:
                    seconds = timed(lambda: teacher_forced.score_teacher_forced(model, **inputs), args.repeats, args.device)
                    outputs[variant] = teacher_forced.score_teacher_forced(model, **inputs)
                rows.append(_row(attn, batch, variant, seconds, memory["mib"]))
            if len(outputs) == 2:
                _check_agree(outputs["current"], outputs["reference"])
            if args.stages:
                for variant in outputs:
                    print_stages(_stage_row(model, inputs, variant, batch, args.targets, args.device))
            if args.target_mode:
                rows.append(_target_mode(model, processor, images, names, attn, batch, args))
        model = None  # frees the weights before the next build
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def _stage_row(model, inputs, variant, batch, targets, device) -> dict:
    """One `score_teacher_forced` call with the stage timers on (GPU: synchronised, so seconds are the stage's)."""
    seconds, calls, restore = stage_timers(model)
    try:
        with variant_context(variant), torch.no_grad():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            teacher_forced.score_teacher_forced(model, **inputs)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            total = time.perf_counter() - start
    finally:
        for owner, name, original in restore:
            setattr(owner, name, original)
    stages = {label: {"s": s, "calls": calls[label]} for label, s in seconds.items()}
    return {"variant": variant, "images": batch, "targets": batch * targets, "loop_s": total, "stages": stages}


def _row(attn, batch, variant, seconds, mib) -> dict:
    row = {
        "attn": attn,
        "batch": batch,
        "variant": variant,
        "images_per_s": batch / seconds,
        "s_per_batch": seconds,
        "peak_mib": mib,
    }
    print(f"| {attn} | {batch} | {variant} | {batch / seconds:.2f} | {seconds:.3f} | {mib:.0f} |", flush=True)
    return row


def _check_agree(current, reference) -> None:
    """Decisions identical; masks within bf16 noise of the reference (printed, not asserted: random weights)."""
    same = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(current.rejected, reference.rejected))
    worst = max(
        (float(((a.float() - b.float()).abs() / (1 + b.float().abs())).max()) for a, b in zip(current.pred_masks, reference.pred_masks) if a.numel()),
        default=0.0,
    )  # fmt: skip
    print(f"|  |  | agreement | decisions identical: {same} | max relative mask difference {worst:.2e} | |", flush=True)


def _target_mode(model, processor, images, names, attn, batch, args) -> dict:
    """`segment(..., targets=...)`: guarded, the call may not exist in this build or may fail."""
    try:
        with torch.no_grad(), peak_memory(args.device) as memory:
            call = functools.partial(model.segment, processor, images, targets=[names] * batch, batch_size=batch)
            seconds = timed(call, args.repeats, args.device)
        return _row(attn, batch, "target mode", seconds, memory["mib"])
    except Exception as error:  # noqa: BLE001 - a benchmark row that names the failure instead of stopping the run
        message = f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
        print(f"| {attn} | {batch} | target mode | failed: {message} | | |", flush=True)
        return {"attn": attn, "batch": batch, "variant": "target mode", "error": message}


def saved_model_benchmark(args) -> list[dict]:
    """A random model saved and loaded back through `load_gsva` once per `--load-ins` entry ("4bit", "8bit": the
    LLM quantized, the rest in `--dtype`; "none"): weight memory, then images/s and peak memory per batch size."""
    from benchmarks.write_bench_preset import write_bench_preset
    from configuration_gsva import GSVAConfig
    from gsva_hf.loading import DTYPES
    from modeling_gsva import GSVAForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="bench_eval_model_"))
    start = time.perf_counter()
    write_bench_preset(args.preset, folder)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = GSVAForCausalLM._from_config(GSVAConfig.from_pretrained(folder), dtype=DTYPES[args.dtype])
    model.save_pretrained(folder)
    del model
    print(f"random model written to {folder} in {time.perf_counter() - start:.0f} s", flush=True)
    try:
        return _time_loaded(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _time_loaded(args, folder: Path) -> list[dict]:
    from gsva_hf.loading import DTYPES, load_gsva

    rows = []
    print("| LLM weights | batch | weights MiB | images/s | s/batch | peak MiB |")
    print("|---|---|---|---|---|---|")
    for load_in in args.load_ins.split(","):
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        model, processor = load_gsva(
            folder, dtype=args.dtype, device=args.device, load_in=None if load_in == "none" else load_in
        )
        weights = model.get_memory_footprint() / 2**20
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            inputs, _, _ = prepared_inputs(
                processor, batch, args.targets, args.image_size, args.device, DTYPES[args.dtype]
            )
            with torch.no_grad(), peak_memory(args.device) as memory:
                seconds = timed(lambda: teacher_forced.score_teacher_forced(model, **inputs), args.repeats, args.device)
            row = {"load_in": load_in, "batch": batch, "weights_mib": weights, "images_per_s": batch / seconds,
                   "s_per_batch": seconds, "peak_mib": memory["mib"]}  # fmt: skip
            rows.append(row)
            print(
                f"| {load_in} | {batch} | {weights:.0f} | {batch / seconds:.2f} | {seconds:.3f} | {memory['mib']:.0f} |",
                flush=True,
            )
        model = None  # frees the weights before the next build
    return rows


# ------------------------------------------------------------------------------------------- entry point
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "gsva_hf" / "assets" / "gsva-tiny-synthetic")
    parser.add_argument("--data", type=Path, help="GSVA data root holding the split (default: a synthetic one)")
    parser.add_argument("--val-dataset", default="grefcoco|unc|val")
    parser.add_argument(
        "--val-images", type=int, default=40, help="images of the synthetic split written when no --data"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--reference-batch-size",
        type=int,
        help="the reference's batch size in the evaluation loop (default: --batch-size; GSVA's main.py asserts 1)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="current,reference")
    parser.add_argument(
        "--cpu-malloc",
        default="keep,default",
        help="malloc settings to run each variant under: keep (eval_hf.py's default on CPU) and/or default",
    )
    parser.add_argument("--stages", action="store_true", help="also time the loop's stages (one table per variant)")
    parser.add_argument(
        "--paired", action="store_true", help="both variants in one process, alternating rounds (ratios, no memory)"
    )
    parser.add_argument("--worker", choices=VARIANTS, help="run one variant in this process and print its JSON row")
    parser.add_argument("--prepared", action="store_true", help="time score_teacher_forced on prepared batches")
    parser.add_argument("--preset", type=Path, default=ROOT / "configs" / "gsva-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--targets", type=int, default=10, help="expressions per image (prepared batches)")
    parser.add_argument("--image-size", type=int, default=120, help="image height, width 4/3 of it (prepared batches)")
    parser.add_argument("--target-mode", action="store_true", help="also time segment(targets=...) (prepared batches)")
    parser.add_argument("--layers", type=int, help="cut the LLM, CLIP and SAM encoder to this many blocks (prepared)")
    parser.add_argument(
        "--load-ins",
        help='save a random model and time it loaded per entry, e.g. "4bit,none" (the LLM in 4-bit, then not)',
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if (args.worker or args.paired) and "," in args.cpu_malloc:
        parser.error("--worker and --paired run under one malloc setting: give --cpu-malloc keep or default")
    if args.paired and args.stages:
        parser.error("--stages times separate processes; run it without --paired")
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    if args.load_ins:
        rows = saved_model_benchmark(args)
    else:
        rows = prepared_benchmark(args) if args.prepared else loop_benchmark(args)
    if args.json:
        from gsva_hf.metrics import strict_json

        args.json.write_text(strict_json(rows, str(args.json)) + "\n")


if __name__ == "__main__":
    main()
