"""What `train_hf.py` checks and reads before anything loads: its flags (a JSON file of them, one-line errors, the
help), the output folder (resumed or refused, never trained into afresh) and the data sources (built before the
model, so a missing one costs no model load). Errors here are the user's: `UsageError`s naming the flag or path."""

import contextlib
import dataclasses
import json
import math
import sys
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from .cli import USAGE_EXIT, UsageError

PROG = "train_hf.py"
SYNTHETIC_HINT = (
    "for the synthetic task: python -m gsva_hf.data.synthetic --out data/synthetic, then --dataset_dir data/synthetic "
    "--dataset refer_seg --sample_rates 1 --refer_seg_data grefcoco"
)
# The Trainer's flags the README's commands use, listed with the project's own in --help.
COMMON_TRAINER_FLAGS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "num_train_epochs", "bf16", "fp16",
    "gradient_checkpointing", "deepspeed", "save_steps", "save_total_limit", "resume_from_checkpoint", "seed",
    "dataloader_num_workers", "report_to",
)  # fmt: skip


def project_fields(cls) -> list[dataclasses.Field]:
    """The flags a dataclass declares itself (for the training arguments: GSVA's own and the defaults it changes)."""
    own = cls.__dict__.get("__annotations__", {})
    return [f for f in dataclasses.fields(cls) if f.name in own]


def project_help(dataclass_types) -> str:
    """The project's flags with help and defaults, then the Trainer flags the README uses."""
    lines = [f"usage: {Path(sys.argv[0]).name} [ARGS.json] [--flag value ...]", ""]
    for cls in dataclass_types:
        lines.append(f"{cls.__name__}:")
        for f in project_fields(cls):
            lines.append(f"  --{f.name:<28} {f.metadata.get('help', '')} (default: {f.default!r})")
        lines.append("")
    trainer_fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    lines.append("Trainer flags the README uses:")
    for name in COMMON_TRAINER_FLAGS:
        f = trainer_fields[name]
        help_text = f.metadata.get("help", "").split(". ")[0].rstrip(".")
        lines.append(f"  --{name:<28} {help_text} (default: {f.default!r})")
    lines.append("")
    lines.append("Flags take _ or - alike (--max_steps, --max-steps); --debug alone shows the traceback of an error.")
    lines.append("Every other transformers TrainingArguments flag works too: --help-all lists them.")
    return "\n".join(lines)


def json_to_args(path: str) -> list[str]:
    """A JSON file of arguments as command-line flags, so flags after it override the file."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"cannot read the arguments file {path}: {error}") from error
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a JSON object of argument names to values")
    flags = []
    for key, value in values.items():
        flags += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    return flags


class OneLineErrorParser(HfArgumentParser):
    """Argument mistakes as one line and exit 2, like the project's other commands."""

    def error(self, message: str):
        self.exit(USAGE_EXIT, f"{PROG}: error: {message}\n")


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Take out a bare `--debug` (the project's: show tracebacks); `--debug VALUE` stays the Trainer's flag."""
    kept, debug = [], False
    for index, arg in enumerate(argv):
        following = argv[index + 1] if index + 1 < len(argv) else None
        if arg == "--debug" and (following is None or following.startswith("--")):
            debug = True
        else:
            kept.append(arg)
    return kept, debug


def check_own_learning_rates(training_args, rates: dict[str, float | None]) -> None:
    """Extra learning rates (flag -> value) must be usable numbers and must reach the optimizer: a DeepSpeed config
    with its own optimizer or scheduler would build param groups the Trainer never splits, silently dropping them."""
    given = [name for name, rate in rates.items() if rate is not None]
    for name in given:
        if not (math.isfinite(rates[name]) and rates[name] >= 0):
            raise ValueError(f"--{name} must be a finite number >= 0, got {rates[name]}")
    if given and training_args.deepspeed:
        config = training_args.deepspeed
        if isinstance(config, str):
            config = json.loads(Path(config).read_text())
        owned = [key for key in ("optimizer", "scheduler") if key in config]
        if owned:
            source = training_args.deepspeed if isinstance(training_args.deepspeed, str) else "(dict)"
            raise ValueError(
                f"--{given[0]} needs the Trainer's optimizer and scheduler, but the DeepSpeed config {source} defines "
                f"{' and '.join(owned)}: remove it (configs/deepspeed_zero2.json has neither)"
            )


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """`checkpoint-N` folders of `output_dir` whose save finished (they hold the Trainer's last file), oldest first."""
    from transformers.trainer import TRAINER_STATE_NAME

    found = [
        p
        for p in output_dir.glob("checkpoint-*")
        if p.name.split("-", 1)[1].isdigit() and (p / TRAINER_STATE_NAME).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def check_output_dir(training_args) -> None:
    """An output folder holding an earlier run is resumed (`--resume_from_checkpoint CKPT` or `latest`) or refused:
    training into it afresh would overwrite that run's checkpoints and export. `latest` becomes the newest complete
    checkpoint, named on stdout."""
    output_dir = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise UsageError(f"--resume_from_checkpoint latest: {output_dir} holds no complete checkpoint-N folder")
        training_args.resume_from_checkpoint = str(found[-1])
        print(f"resuming from {found[-1]}, the latest complete checkpoint in {output_dir}", flush=True)
        return
    if resume or training_args.export_only or not output_dir.is_dir():
        return
    earlier = sorted(
        p.name
        for p in output_dir.iterdir()
        if p.name.startswith("checkpoint-") or p.name in ("train_args.json", "final")
    )
    if earlier:
        found = complete_checkpoints(output_dir)
        resume_hint = f"resume it with --resume_from_checkpoint {found[-1]} (or latest), or " if found else ""
        raise UsageError(
            f"--output_dir {output_dir} holds an earlier run ({', '.join(earlier[:5])}); {resume_hint}give a new --output_dir"
        )


def check_data(data_args, training_args, build_train_dataset):
    """The training set (`build_train_dataset(data_args, training_args)`) and the validation sets, built before the
    model so a missing source costs no model load; returns the training set."""
    from gsva_hf.data.mixed import build_val_dataset

    sources = [s for s in data_args.dataset.split("||") if s.strip()]
    all_hf = sources == ["refer_seg"] and all(d.startswith("hf:") for d in data_args.refer_seg_data.split("||") if d)
    if not data_args.dataset_dir and not all_hf:
        raise UsageError(f"--dataset_dir is required: GSVA's data tree (README, Data); {SYNTHETIC_HINT}")
    if data_args.dataset_dir and not all_hf and not Path(data_args.dataset_dir).is_dir():
        raise UsageError(f"--dataset_dir {data_args.dataset_dir}: no such folder; {SYNTHETIC_HINT}")
    dataset_dir = data_args.dataset_dir or None
    with usage_hint(f"--dataset {data_args.dataset!r} names the sources to read from --dataset_dir; {SYNTHETIC_HINT}"):
        train_dataset = build_train_dataset(data_args, training_args)
    if data_args.val_dataset:
        with usage_hint("--val_dataset names the split evaluated after training ('' to skip)"):
            for spec in data_args.val_dataset.split("||"):
                build_val_dataset(dataset_dir, spec.strip())
    return train_dataset


@contextlib.contextmanager
def usage_hint(hint: str):
    """Add what to pass to a data error (a missing folder or split), keeping its message and type."""
    try:
        yield
    except (OSError, ValueError) as error:
        error.add_note(hint)
        raise
