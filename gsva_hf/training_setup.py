"""What `train_hf.py` checks and reads before anything loads: its flags (a JSON file of them, one-line errors, the
help, number flags in range), the output folder (resumed by its own run or refused, never trained into afresh), the
export folder (absent, empty, or that run's earlier export) and the data sources (built before the model, so a
missing one costs no model load). Errors here are the user's: `UsageError`s naming the flag or path."""

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from .cli import USAGE_EXIT, UsageError, check_creatable, refuse_link
from .export import REMOTE_CODE_FILES
from .training import complete_checkpoints

PROG = "train_hf.py"
SYNTHETIC_HINT = (
    "for the synthetic task: python -m gsva_hf.data.synthetic --out data/synthetic, then --dataset_dir data/synthetic "
    "--dataset refer_seg --sample_rates 1 --refer_seg_data grefcoco"
)
# The Trainer's flags the README's commands use, listed with the project's own in --help.
COMMON_TRAINER_FLAGS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "num_train_epochs", "bf16", "fp16",
    "activation_checkpointing", "deepspeed", "save_steps", "save_total_limit", "resume_from_checkpoint", "seed",
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


# The number flags `check_numbers` bounds, before the model loads: a NaN learning rate fails only in the optimizer,
# a NaN --max_grad_norm silently turns clipping off, a NaN loss weight ends the run at its first step.
NON_NEGATIVE_FLAGS = (
    "learning_rate", "weight_decay", "max_grad_norm", "warmup_steps", "warmup_ratio", "adam_epsilon",
    "num_train_epochs", "ce_loss_weight", "bce_loss_weight", "dice_loss_weight", "seg_rej_ce_weight",
)  # fmt: skip
BELOW_ONE_FLAGS = ("lora_dropout", "adam_beta1", "adam_beta2")
AT_LEAST_ONE_FLAGS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "eval_batch_size",
    "num_classes_per_sample",
)


def check_numbers(*arguments) -> None:
    """Refuse, naming the flag, number flags of the parsed `arguments` (the dataclasses) that no run can use: NaN
    or infinite values, negative rates and weights, a dropout or beta outside [0, 1), batch sizes below 1, LoRA
    with lora_alpha <= 0, and neither --max_steps nor --num_train_epochs above 0."""
    values = {}
    for group in arguments:
        values.update(vars(group))

    def given(names):
        return [(name, values[name]) for name in names if values.get(name) is not None]

    for name, value in given(NON_NEGATIVE_FLAGS):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name} must be a finite number >= 0, got {value!r}")
    for name, value in given(BELOW_ONE_FLAGS):
        if not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise UsageError(f"--{name} must be a number from 0 to below 1, got {value!r}")
    if values.get("explanatory") is not None and not 0 <= values["explanatory"] <= 1:
        raise UsageError(f"--explanatory is a share of samples, from 0 to 1, got {values['explanatory']!r}")
    for name, value in given(AT_LEAST_ONE_FLAGS):
        if value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value!r}")
    if values.get("samples_per_epoch") is not None and values["samples_per_epoch"] < 0:
        raise UsageError(
            f"--samples_per_epoch must be >= 0 (0: from the batch size and steps), got {values['samples_per_epoch']}"
        )
    lora_r = values.get("lora_r")
    if lora_r is not None:
        if isinstance(lora_r, bool) or not isinstance(lora_r, int):
            raise UsageError(
                f"--lora_r must be an int (>0: LoRA rank, 0: LLM frozen, <0: the whole LLM trains), got {lora_r!r}"
            )
        if lora_r > 0 and not values.get("lora_alpha", 1) > 0:
            raise UsageError(
                f"--lora_alpha must be > 0 with LoRA (--lora_r {lora_r}), got {values.get('lora_alpha')!r}"
            )
    if (
        not values.get("export_only")
        and "max_steps" in values
        and not (values["max_steps"] > 0 or values.get("num_train_epochs", 0) > 0)
    ):
        raise UsageError(
            f"--max_steps {values['max_steps']} and --num_train_epochs {values.get('num_train_epochs')}: give --max_steps "
            "above 0 (or --num_train_epochs above 0)"
        )


# What a training run leaves in its output folder; any of them there means the folder holds an earlier run.
RUN_MARKERS = ("train_args.json", "eval_results.json", "final")
# The files `export_model` writes (besides the weights): the config, the processor's and tokenizer's files, the code.
EXPORT_FILES = {
    "config.json", "generation_config.json", "model.safetensors.index.json", "chat_template.jinja",
    "chat_template.json", "processor_config.json", "preprocessor_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json",
    "merges.txt", "README.md", *REMOTE_CODE_FILES,
}  # fmt: skip
EXPORT_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def earlier_run(output_dir: Path) -> list[str]:
    """The names in `output_dir` that a training run leaves (checkpoints, its records, its export)."""
    if not output_dir.is_dir():
        return []
    return sorted(p.name for p in output_dir.iterdir() if p.name.startswith("checkpoint-") or p.name in RUN_MARKERS)


def is_inside(path, folder) -> bool:
    """Whether `path` lies in `folder` (links resolved), at any depth."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def export_leftovers(folder: Path) -> list[str]:
    """The entries of `folder` that an export does not write (anything but regular files with the names
    `export_model` gives, a config.json that is not GSVA's included): an export would replace or delete files there
    that may be a user's."""
    foreign = []
    for entry in sorted(folder.iterdir()):
        if (
            entry.is_symlink()
            or not entry.is_file()
            or not (entry.name in EXPORT_FILES or EXPORT_WEIGHTS.fullmatch(entry.name))
        ):
            foreign.append(entry.name)
    config = folder / "config.json"
    if config.is_file() and "config.json" not in foreign:
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            model_type = None
        if model_type != "gsva":
            foreign.append("config.json (not a GSVA config)")
    return foreign


def check_export_dir(training_args, same_run: bool) -> None:
    """The export folder (--export_dir, or OUTPUT_DIR/final) must be absent or empty: `save_pretrained` replaces
    config.json and deletes shards it did not write. Only the earlier export of the run being resumed or exported
    (`same_run`) is replaced, and only when it holds nothing but the files an export writes."""
    flag = "--export_dir" if training_args.export_dir else "--output_dir"
    export_dir = Path(training_args.export_dir or Path(training_args.output_dir) / "final")
    refuse_link(export_dir, flag)
    check_creatable(export_dir, flag)
    if not export_dir.is_dir() or not any(export_dir.iterdir()):
        return
    foreign = export_leftovers(export_dir)
    if same_run and not foreign:
        return
    why = (
        f"it holds files an export does not write ({', '.join(foreign[:5])})"
        if foreign
        else "it holds an export that is not of the run being resumed or exported"
    )
    raise UsageError(
        f"{flag}: the export folder {export_dir} is not empty and {why}; the export would replace or delete files "
        "there: give an absent or empty --export_dir (or a new --output_dir)"
    )


def check_output_dir(training_args) -> None:
    """An output folder holding an earlier run is resumed (`--resume_from_checkpoint CKPT` inside it, or `latest`)
    or refused: training into it afresh, or resuming another run's checkpoint there, would prune that run's
    checkpoints and overwrite its export. `latest` becomes the newest complete checkpoint, named on stdout. The
    output and export folders must be creatable, and the export folder absent, empty or this run's earlier export
    (`check_export_dir`)."""
    output_dir = Path(training_args.output_dir)
    check_creatable(output_dir, "--output_dir")
    resume = training_args.resume_from_checkpoint
    if training_args.export_only and not resume:
        raise UsageError("--export_only needs --resume_from_checkpoint CHECKPOINT_DIR")
    if resume == "latest":
        found = complete_checkpoints(output_dir) if output_dir.is_dir() else []
        if not found:
            raise UsageError(f"--resume_from_checkpoint latest: {output_dir} holds no complete checkpoint-N folder")
        training_args.resume_from_checkpoint = resume = str(found[-1])
        print(f"resuming from {found[-1]}, the latest complete checkpoint in {output_dir}", flush=True)
    earlier = earlier_run(output_dir)
    same_run = resume is True or (
        isinstance(resume, (str, os.PathLike)) and bool(resume) and is_inside(resume, output_dir)
    )
    if earlier and not same_run:
        if resume:
            raise UsageError(
                f"--resume_from_checkpoint {resume} lies outside --output_dir {output_dir}, which holds an earlier run "
                f"({', '.join(earlier[:5])}); resuming there would prune that run's checkpoints and overwrite its "
                "export: give a new --output_dir (or a checkpoint of that run)"
            )
        found = complete_checkpoints(output_dir)
        resume_hint = f"resume it with --resume_from_checkpoint {found[-1]} (or latest), or " if found else ""
        raise UsageError(
            f"--output_dir {output_dir} holds an earlier run ({', '.join(earlier[:5])}); {resume_hint}give a new --output_dir"
        )
    check_export_dir(training_args, same_run or bool(training_args.export_only))


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
