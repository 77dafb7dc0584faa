"""Evaluate a GSVA folder with the original protocol (teacher forced) or with generated answers.

    python eval_hf.py --model DIR --val_dataset "grefcoco|unc|val" --dataset_dir DATA
    python eval_hf.py ... --mode targets                      # the user path: segment(targets=expressions)
    python eval_hf.py ... --mode generate                     # the model's own answer, free generation
    python eval_hf.py ... --protocol rela                     # ReLA's definitions (480x480, FP I=0)
    torchrun --nproc_per_node 2 eval_hf.py ...                # several processes (CPU: gloo), each sample once
    accelerate launch --multi_gpu --num_processes 8 eval_hf.py ...

Prints GSVA's log line (`grefcoco giou: ..., ciou: ..., N_acc: ..., T_acc: ....`) per dataset and writes a
JSON file with the metrics and per-sample results. Before evaluating anything it checks that every dataset's image
files exist and open and that every output file can be written, and refuses naming what is wrong, so no partial
evaluation is computed and then lost. Exit status 2 for a usage error (one line; --debug for the traceback). A model
folder's own code runs only with --trust_remote_code. Flags take `_` or `-` alike (--max_new_tokens, --max-new-tokens).
"""

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

import torch

from gsva_hf.cli import CommandParser, UsageError, name_the_cpu_for_deepspeed, usage_errors
from gsva_hf.cpu_memory import MALLOC_CHOICES, apply_malloc_choice
from gsva_hf.loading import DTYPES, add_loading_arguments

PROG = "eval_hf.py"

SHOWN_PROBLEMS = 20
FILE_NAME_UNSAFE = re.compile(r"[^\w.+-]+")


def parse_args(argv=None) -> argparse.Namespace:
    parser = CommandParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="saved GSVA folder or Hub repo id")
    parser.add_argument("--dataset_dir", type=Path, help="GSVA's data tree (holds refer_seg/, reason_seg/); not needed for hf: specs")
    parser.add_argument("--val_dataset", default="grefcoco|unc|val", help='spec(s), "||"-joined: "grefcoco|unc|val||ReasonSeg|val"; "hf:PATH_OR_REPO|val" reads a datasets source')
    parser.add_argument(
        "--mode",
        choices=["teacher_forced", "targets", "generate"],
        default="teacher_forced",
        help="teacher_forced: GSVA's protocol; targets: segment(targets=expressions), the model decides each slot; "
        "generate: the model writes its own answer",
    )
    parser.add_argument("--protocol", choices=["gsva", "rela"], default="gsva", help="gRefCOCO metric definitions")
    parser.add_argument("--ignore_mode", choices=["gsva", "lisa"], default="gsva", help='ReasonSeg "ignore" pixels: foreground (gsva) or excluded (lisa)')
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--output", type=Path, help="JSON file (default: ./eval_<model>_<dataset>_<mode>.json, the model as given with / as _)")
    parser.add_argument("--no_progress", action="store_true")
    parser.add_argument(
        "--cpu_malloc",
        choices=MALLOC_CHOICES,
        default="keep",
        help="on the CPU, keep: glibc's malloc keeps freed memory for the next batch (not faulted in again each batch); "
        "default: the C library's own settings",
    )
    add_loading_arguments(parser, underscores=True)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        parser.error(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    return args


def output_path(args: argparse.Namespace, spec: str) -> Path:
    name = FILE_NAME_UNSAFE.sub("_", spec)
    if args.output is None:
        # In the working folder, never inside the model's (a repo id, a Hub cache, an installed package).
        model = FILE_NAME_UNSAFE.sub("_", str(args.model).strip("./")) or "model"
        return Path(f"eval_{model}_{name}_{args.mode}.json")
    if len(specs(args)) > 1:
        return args.output.with_name(f"{args.output.stem}_{name}{args.output.suffix}")
    return args.output


def specs(args: argparse.Namespace) -> list[str]:
    return [s.strip() for s in args.val_dataset.split("||") if s.strip()]


def check_writable(path: Path) -> None:
    """Raise naming `path` unless a file can be created there (checked before any evaluation). An existing file is
    replaced only when it is an earlier output of this command (never a link, a model's config, a user's file)."""
    if path.is_symlink() or (path.exists() and not is_earlier_output(path)):
        raise UsageError(
            f"--output {path} exists and is not an evaluation JSON written by {PROG}; it is left as it is: "
            "pass --output with a new file name"
        )
    try:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".eval_write_check_"):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is read-only")
    except OSError as error:
        raise UsageError(f"cannot write the evaluation output {path} ({error}); pass --output FILE.json in a writable folder") from error


def is_earlier_output(path: Path) -> bool:
    """Whether `path` is a JSON object with what this command writes (the dataset spec, the mode and metrics)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and {"val_dataset", "mode", "metrics"} <= record.keys()


def check_images(dataset, spec: str) -> None:
    """Refuse, listing them, a dataset whose image files are missing or unreadable (before any evaluation)."""
    from gsva_hf.evaluation import dataset_image_paths, unreadable_images

    paths = dataset_image_paths(dataset)
    problems = unreadable_images(paths) if paths is not None else []
    if problems:
        shown = "\n  ".join(problems[:SHOWN_PROBLEMS])
        more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise UsageError(f"{spec}: {len(problems)} of {len(set(paths))} image files cannot be read:\n  {shown}{more}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    from accelerate import Accelerator

    from gsva_hf.data.mixed import build_val_dataset
    from gsva_hf.evaluation import evaluate_dataset
    from gsva_hf.loading import load_gsva_pinned

    name_the_cpu_for_deepspeed()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    apply_malloc_choice(args.cpu_malloc, str(accelerator.device))
    with usage_errors(PROG, args.debug):
        if not specs(args):
            raise UsageError("--val_dataset is empty; give a spec such as 'grefcoco|unc|val'")
        datasets = {spec: build_val_dataset(args.dataset_dir, spec) for spec in specs(args)}
        for spec, dataset in datasets.items():
            check_images(dataset, spec)
            if accelerator.is_main_process:
                check_writable(output_path(args, spec))
        model, processor = load_gsva_pinned(
            args.model,
            dtype=args.dtype,
            device=str(accelerator.device),
            trust_remote_code=args.trust_remote_code,
            revision=args.revision,
        )
    all_metrics = {}
    for spec, dataset in datasets.items():
        result = evaluate_dataset(
            model,
            processor,
            dataset,
            mode=args.mode,
            protocol=args.protocol,
            ignore_mode=args.ignore_mode,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            accelerator=accelerator,
            progress=not args.no_progress,
        )
        all_metrics[spec] = result.metrics
        if accelerator.is_main_process:
            print(result.log_line, flush=True)
            result.accumulator.write_json(
                output_path(args, spec),
                val_dataset=spec,
                mode=args.mode,
                protocol=args.protocol,
                model=str(args.model),
                dtype=args.dtype,
                processes=accelerator.num_processes,
                log_line=result.log_line,
                images=result.records,
            )
            print(f"wrote {output_path(args, spec)}", flush=True)
    # Tear the process group down before exit: a gloo group left alive can abort a rank at interpreter shutdown.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return all_metrics


if __name__ == "__main__":
    main()
