"""What trains, LoRA, the Trainer subclass that logs GSVA's loss parts, and the merged export.

GSVA's recipe (`model/prepare_model_tokenizer.py`): everything frozen, LoRA on the LLM's q/v projections,
`embed_tokens`, `lm_head`, SAM's mask decoder and `text_hidden_fcs` fully trained; CLIP, the projector and
SAM's image and prompt encoders frozen. Flags open the frozen parts for a from-scratch tiny model.
Also the progress line every stage prints.
"""

import errno
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from .export import give_umask_mode
from .loading import NonFiniteError, check_finite_weights

FULLY_TRAINED = ("lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs")
# Module names per flag; a composed VLM names its vision tower `visual` (Qwen-VL, projector inside) or
# `vision_model` (Idefics3, SmolVLM) and its projector `connector` (Idefics3, SmolVLM).
OPTIONAL_MODULES = {
    "train_vision_tower": ("vision_tower", "visual", "vision_model"),
    "train_projector": ("multi_modal_projector", "connector"),
    "train_sam_encoder": ("vision_encoder",),
    "train_prompt_encoder": ("prompt_encoder",),
}


def lora_target_regex(target_modules: list[str] | str) -> str:
    """Regex selecting only the LLM's projections: a plain list would also hit CLIP's and SAM's q/v_proj (and a
    composed VLM's vision tower). The LLM is `language_model` (LLaVA, Qwen-VL, Gemma 3) or `text_model` (Idefics3,
    SmolVLM)."""
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    names = [n.strip() for part in names for n in part.split(",") if n.strip()]
    if not names:
        raise ValueError("lora_target_modules is empty; give module names such as q_proj,v_proj")
    return r".*(language_model|text_model)\..*\.(" + "|".join(re.escape(n) for n in names) + r")"


def prepare_for_training(
    model,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules: str | list[str] = "q_proj,v_proj",
    train_vision_tower: bool = False,
    train_projector: bool = False,
    train_sam_encoder: bool = False,
    train_prompt_encoder: bool = False,
):
    """Set what trains. `lora_r` > 0: LoRA on the LLM; 0: LLM frozen; < 0: the whole LLM trains (GSVA's switch).

    Returns the model to train: a peft `PeftModel` when LoRA is used (fully trained modules are peft's
    `modules_to_save`, so checkpoints hold them), else the model itself.
    """
    flags = {
        "train_vision_tower": train_vision_tower,
        "train_projector": train_projector,
        "train_sam_encoder": train_sam_encoder,
        "train_prompt_encoder": train_prompt_encoder,
    }
    full_modules = list(FULLY_TRAINED) + [name for f, on in flags.items() if on for name in OPTIONAL_MODULES[f]]
    model.requires_grad_(False)
    if lora_r > 0:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias="none",
            target_modules=lora_target_regex(lora_target_modules),
            # peft wraps modules, not ModuleLists: `text_hidden_fcs.0` is its one Sequential.
            modules_to_save=[f"{m}.0" if m == "text_hidden_fcs" else m for m in full_modules],
        )
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing` alias while wrapping; nothing to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
            return get_peft_model(model, config)
    if lora_r < 0:
        full_modules += ["language_model", "text_model"]
    for name, parameter in model.named_parameters():
        if any(f".{module}." in f".{name}" for module in full_modules):
            parameter.requires_grad_(True)
    return model


def trainable_parameter_names(model) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def merged_model(model):
    """The plain GSVA model with LoRA merged (W + alpha/r * B A) and peft's module copies folded back."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def export_model(model, processor, output_dir: str | Path, max_shard_size: str = "5GB") -> Path:
    """Save a complete folder that loads with `trust_remote_code=True`: safetensors, config, processor, code."""
    output_dir = Path(output_dir)
    plain = merged_model(model)
    check_exportable(plain, output_dir)
    plain.config.use_cache = True
    plain.save_pretrained(output_dir, max_shard_size=max_shard_size)
    processor.save_pretrained(output_dir)
    give_umask_mode(output_dir)
    return output_dir


DIVERGED_HINT = "Lower --learning_rate, keep --max_grad_norm clipping on, or check the data of this step."


def check_finite_gradients(model, step: str) -> None:
    """Raise `NonFiniteError` when the norm of the gradients on `model`'s parameters is NaN or infinite, naming
    `step` and the first parameters whose gradient is not finite. Gradients kept off the parameters (DeepSpeed
    ZeRO) are not seen here; the next step's loss check stops such a run instead."""
    import torch

    grads = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    if not grads:
        return
    device = grads[0][1].device
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float32).to(device) for _, g in grads])
    norm = float(torch.linalg.vector_norm(norms))
    if math.isfinite(norm):
        return
    bad = [name for (name, _), value in zip(grads, norms.tolist()) if not math.isfinite(value)]
    shown = ", ".join(bad[:5]) + (f" ... and {len(bad) - 5} more" if len(bad) > 5 else "")
    where = f"{len(bad)} of {len(grads)} gradients are not finite: {shown}" if bad else "their sum of squares overflows"
    raise NonFiniteError(
        f"{step}: the gradient norm is not finite ({norm}); {where}. Training stopped before this step's update "
        f"and nothing was exported. {DIVERGED_HINT}"
    )


def check_exportable(model, output_dir) -> None:
    """Refuse to export a model with a NaN or infinite tensor (named, with the count): nothing is written."""
    check_finite_weights(model, f"export to {output_dir}: nothing was written")


def is_mask_head(name: str) -> bool:
    """SAM (any part) and `text_hidden_fcs`: the modules that turn `[SEG]` states into masks."""
    return ".sam." in f".{name}" or "text_hidden_fcs" in name


class GSVATrainer(Trainer):
    """Trainer that logs GSVA's CE, BCE and Dice parts (averaged over the logging window) and can give the mask
    head its own learning rate (`mask_head_learning_rate`; None keeps GSVA's single rate). Subclasses add rates
    for other parameters by extending `_own_learning_rates`. It stops with `NonFiniteError` at the first NaN or
    infinite loss part or gradient norm, naming the step."""

    def __init__(self, *args, mask_head_learning_rate: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_head_learning_rate = mask_head_learning_rate
        self._part_sums: dict[str, float] = {}
        self._part_count = 0

    def _own_learning_rates(self, model) -> dict[int, tuple[str, float]]:
        """Parameter id -> (flag, learning rate) for the trainable parameters that do not use `learning_rate`; a
        rate that reaches no trainable parameter is an error, not a no-op."""
        rates = {}
        if self.mask_head_learning_rate is not None:
            head = [p for n, p in model.named_parameters() if p.requires_grad and is_mask_head(n)]
            if not head:
                raise ValueError("--mask_head_learning_rate is set but no SAM or text_hidden_fcs parameter trains")
            rates.update({id(p): ("mask_head_learning_rate", self.mask_head_learning_rate) for p in head})
        return rates

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        rates = self._own_learning_rates(model or self.model)
        if not rates or getattr(optimizer, "_gsva_split", False):
            return optimizer
        groups, reached = [], set()
        for group in optimizer.param_groups:
            by_kind: dict[str, tuple[float, list]] = {}
            for p in group["params"]:
                kind, lr = rates.get(id(p), ("learning_rate", group["lr"]))
                by_kind.setdefault(kind, (lr, []))[1].append(p)
                reached.add(kind)
            groups += [{**group, "params": params, "lr": lr} for lr, params in by_kind.values()]
        missing = {kind for kind, _ in rates.values()} - reached
        if missing:
            raise ValueError(
                f"--{sorted(missing)[0]}: its parameters are not in the optimizer (an --optim that builds its own "
                "groups cannot take it)"
            )
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        optimizer._gsva_split = True
        return optimizer

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, or none: a save that fails (disk full above all) removes the half-written
        folder, which `--resume_from_checkpoint` would otherwise pick as the latest, and says what happened."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        existed = os.path.lexists(folder)  # only a folder this save created is ever removed
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:
            if self.args.should_save and not existed and os.path.isdir(folder) and not os.path.islink(folder):
                shutil.rmtree(folder, ignore_errors=True)
                what = "the partial checkpoint was removed"
            else:
                what = "the folder existed before this save and was left as it is: it may be partly overwritten"
            if is_disk_full(error):
                free = shutil.disk_usage(os.path.dirname(folder) or ".").free
                raise OSError(
                    errno.ENOSPC,
                    f"no space left on device while saving checkpoint {folder} ({free / 2**20:.0f} MiB free; "
                    f"{what}): {error}",
                ) from error
            error.add_note(f"while saving checkpoint {folder} ({what})")
            raise
        if self.args.should_save and os.path.isdir(folder):
            give_umask_mode(folder)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """The Trainer's `train`, refusing to resume from a checkpoint whose save never finished."""
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            check_checkpoint_complete(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            parts = {}
            for name in ("ce_loss", "mask_bce_loss", "mask_dice_loss"):
                value = getattr(outputs, name, None)
                if value is not None:
                    parts[name] = float(value.detach())
                    self._part_sums[name] = self._part_sums.get(name, 0.0) + parts[name]
            self._part_count += 1
            self._check_finite_loss(float(outputs.loss.detach()), parts)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _step_name(self) -> str:
        return f"step {self.state.global_step + 1}/{self.state.max_steps}"

    def _check_finite_loss(self, loss: float, parts: dict[str, float]) -> None:
        """Stop at the first NaN or infinite loss, naming the step and the part: the Trainer would log it as 0
        (`logging_nan_inf_filter`) and go on to export a model of NaNs."""
        bad = [LOSS_PARTS[name] for name, value in parts.items() if not math.isfinite(value)]
        if not math.isfinite(loss) and not bad:
            bad = ["total"]
        if bad:
            values = " ".join(f"{LOSS_PARTS[name]} {value:.4g}" for name, value in parts.items())
            raise NonFiniteError(
                f"{self._step_name()}: the {' and '.join(bad)} loss{'es are' if len(bad) > 1 else ' is'} not finite "
                f"(loss {loss:.4g}: {values}); "
                f"training stopped before this step's update and nothing was exported. {DIVERGED_HINT}"
            )

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step, then a check that the gradients accumulated so far have a finite norm, before
        clipping and the optimizer can spread a NaN into every weight. Skipped under fp16 loss scaling, whose
        scaler skips the steps that overflow on purpose."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if getattr(self.accelerator, "scaler", None) is None:
            check_finite_gradients(model, self._step_name())
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._part_count and "loss" in logs:
            for name, total in self._part_sums.items():
                logs[name] = round(total / self._part_count, 6)
            self._part_sums, self._part_count = {}, 0
        super().log(logs, start_time)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """`checkpoint-N` folders of `output_dir` whose save finished (they hold the Trainer's last file), oldest first."""
    from transformers.trainer import TRAINER_STATE_NAME

    found = [
        p
        for p in output_dir.glob("checkpoint-*")
        if p.name.split("-", 1)[1].isdigit() and (p / TRAINER_STATE_NAME).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def check_checkpoint_complete(folder) -> dict:
    """The Trainer writes `trainer_state.json` last, so a checkpoint folder without it is a save that was cut short
    (a killed process); resuming from it would load half a state. Returns that file's JSON object, refusing one
    that does not parse (a truncated write) with a ValueError naming the file."""
    from transformers.trainer import TRAINER_STATE_NAME

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--resume_from_checkpoint {folder}: no such checkpoint folder")
    if not os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)):
        complete = complete_checkpoints(Path(folder).absolute().parent)
        hint = f"; the latest complete one is {complete[-1]}" if complete else ""
        raise ValueError(
            f"--resume_from_checkpoint {folder}: the checkpoint is incomplete (no {TRAINER_STATE_NAME}, which the "
            f"Trainer writes last: its save was interrupted); remove it{hint}"
        )
    state_file = os.path.join(folder, TRAINER_STATE_NAME)
    try:
        with open(state_file, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(
            f"--resume_from_checkpoint {folder}: {state_file} is not readable JSON ({error}); the checkpoint is "
            "damaged: use another checkpoint-N folder"
        ) from error
    if not isinstance(state, dict):
        raise ValueError(
            f"--resume_from_checkpoint {folder}: {state_file} holds a JSON {type(state).__name__}, not the Trainer's "
            "state object; the checkpoint is damaged: use another checkpoint-N folder"
        )
    return state


# Values read from each frozen tensor: enough to tell two bases apart, few enough for trainer_state.json.
BASE_SAMPLES = 8
# Two values agree when they differ by less than this share of the larger (bf16 keeps about 3 digits) plus a floor.
BASE_RTOL, BASE_ATOL = 1e-2, 1e-5


def frozen_fingerprint(model, samples: int = BASE_SAMPLES) -> dict[str, str]:
    """{name: "SHAPE: v1 v2 ..."} for every floating-point tensor of `model` (weights and buffers) that does not
    train: its shape and `samples` evenly spaced values. A LoRA or partial checkpoint holds only what trains, so
    these tensors come from the base model it is loaded onto; they identify that base."""
    import torch

    trained = {id(p) for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    prints = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        # peft's `original_module` is the base's copy of a fully trained module: the checkpoint replaces it.
        if id(tensor) in trained or ".original_module." in name or not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        flat = tensor.detach().reshape(-1)
        picked = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel()), device=flat.device).long()
        values = flat[picked].float().tolist() if flat.numel() else []
        prints[name] = "x".join(str(d) for d in tensor.shape) + ": " + " ".join(f"{v:.6g}" for v in values)
    return prints


def _parse_fingerprint(entry: str) -> tuple[str, list[float]]:
    shape, _, values = entry.partition(": ")
    return shape, [float(v) for v in values.split()]


PEFT_PREFIX = "base_model.model."


def current_tensor_name(name: str) -> str:
    """A tensor name recorded by an earlier layout (0.1: one class, `language_model` a causal LM), peft's prefix
    kept, in the current layout (`modeling_gsva.current_key`)."""
    from modeling_gsva import current_key

    if name.startswith(PEFT_PREFIX):
        return PEFT_PREFIX + current_key(name[len(PEFT_PREFIX) :])
    return current_key(name)


def fingerprint_differences(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """The frozen tensors on which two `frozen_fingerprint`s disagree, each with why; names recorded in the 0.1
    layout are compared under their current names (`current_tensor_name`)."""
    recorded = {current_tensor_name(name): entry for name, entry in recorded.items()}
    differ = []
    for name, entry in recorded.items():
        if name not in current:
            differ.append(f"{name} (not a frozen tensor of this model)")
            continue
        (shape, values), (shape_now, values_now) = _parse_fingerprint(entry), _parse_fingerprint(current[name])
        if shape != shape_now:
            differ.append(f"{name} (shape {shape} in the base trained from, {shape_now} here)")
        elif len(values) != len(values_now) or any(
            abs(a - b) > BASE_RTOL * max(abs(a), abs(b)) + BASE_ATOL for a, b in zip(values, values_now)
        ):
            differ.append(f"{name} (other values)")
    differ += [f"{name} (frozen here, trained in the checkpoint)" for name in current if name not in recorded]
    return differ


class BaseModelRecord(TrainerCallback, ExportableState):
    """Which base model a run trains on, kept in every checkpoint's trainer_state.json (the Trainer's state of
    its stateful callbacks): the path given and its `frozen_fingerprint`. A LoRA checkpoint exported or resumed
    onto another base would run without error and give a broken model; `check_checkpoint_base` refuses that."""

    def __init__(self, model_name_or_path: str, frozen: dict[str, str]):
        self.model_name_or_path = model_name_or_path
        self.frozen = frozen

    @classmethod
    def of(cls, model, model_name_or_path: str | Path) -> "BaseModelRecord":
        path = Path(model_name_or_path)
        return cls(str(path.absolute()) if path.exists() else str(model_name_or_path), frozen_fingerprint(model))

    def state(self) -> dict:
        return {"args": {"model_name_or_path": self.model_name_or_path, "frozen": self.frozen}, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        # A run resumed from a checkpoint saved without this record has no entry for it; the Trainer's save needs one.
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())


def check_checkpoint_base(checkpoint, trainer_state: dict, current: BaseModelRecord) -> None:
    """Refuse, naming both bases, a checkpoint whose recorded base model (`BaseModelRecord`, in `trainer_state`,
    the checkpoint's trainer_state.json) differs from `current`'s in a tensor the checkpoint does not hold. A
    checkpoint saved without the record cannot be checked: that is said on stderr."""
    from transformers.trainer import TRAINER_STATE_NAME

    state_file = os.path.join(os.fspath(checkpoint), TRAINER_STATE_NAME)
    callbacks = trainer_state.get("stateful_callbacks") or {}
    record = callbacks.get(BaseModelRecord.__name__) if isinstance(callbacks, dict) else None
    if record is None:
        print(
            f"note: {state_file} does not record the base model the checkpoint was trained from (saved by an older "
            f"gsva-hf); make sure --model_name_or_path {current.model_name_or_path} is that base",
            file=sys.stderr,
        )
        return
    record = record[0] if isinstance(record, list) and record else record
    args = record.get("args") if isinstance(record, dict) else None
    if not (
        isinstance(args, dict)
        and isinstance(args.get("model_name_or_path"), str)
        and isinstance(args.get("frozen"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in args["frozen"].items())
    ):
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: {state_file}: its {BaseModelRecord.__name__} entry is malformed")
    try:
        differ = fingerprint_differences(args["frozen"], current.frozen)
    except ValueError as error:
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: {state_file}: its {BaseModelRecord.__name__} entry is malformed ({error})") from error
    if differ:
        shown = ", ".join(differ[:5]) + (f" ... and {len(differ) - 5} more" if len(differ) > 5 else "")
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} was trained from the base model {args['model_name_or_path']}, but "
            f"--model_name_or_path {current.model_name_or_path} differs from it in {len(differ)} of "
            f"{len(args['frozen'].keys() | current.frozen.keys())} tensors the checkpoint does not hold: {shown}. "
            f"Give --model_name_or_path {args['model_name_or_path']} (and the training run's flags and --seed)"
        )


def is_disk_full(error: BaseException) -> bool:
    """Whether a save failed for lack of space: ENOSPC, or the messages torch's zip writer ("unexpected pos",
    "file write failed") and safetensors ("No space left", StorageFull) give for it."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return any(sign in text for sign in ("unexpected pos", "file write failed", "No space left", "StorageFull"))


def folder_has_weights(path: str | Path) -> bool:
    """Whether `from_pretrained` finds weights in `path` (a preset folder holds only a config and a processor)."""
    return any(Path(path).glob("*.safetensors")) or any(Path(path).glob("*.bin"))


def count_parameters(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


def format_duration(seconds: float) -> str:
    """45s, 12m03s, 1h02m: short enough for a progress line, exact enough for an ETA."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


LOSS_PARTS = {"ce_loss": "ce", "mask_bce_loss": "bce", "mask_dice_loss": "dice"}


def progress_line(
    step: int, total: int, elapsed: float, steps_done: int, loss: float | None = None, parts: dict | None = None,
    learning_rate: float | None = None, stage: str = "",
) -> str:  # fmt: skip
    """`step 100/6000  loss 1.23 (ce 0.4 bce 0.5 dice 0.3)  lr 0.0003  12m03s elapsed  ETA 1h02m`; the ETA is
    the pace of the `steps_done` steps this process ran (a resumed run's earlier steps do not count)."""
    fields = [f"{stage + ' ' if stage else ''}step {step}/{total}"]
    if loss is not None:
        named = " ".join(f"{short} {parts[name]:.4g}" for name, short in LOSS_PARTS.items() if name in (parts or {}))
        fields.append(f"loss {loss:.4g}" + (f" ({named})" if named else ""))
    if learning_rate is not None:
        fields.append(f"lr {learning_rate:.3g}")
    fields.append(f"{format_duration(elapsed)} elapsed")
    if 0 < steps_done and step < total:
        fields.append(f"ETA {format_duration(elapsed / steps_done * (total - step))}")
    return "  ".join(fields)


class ProgressLineCallback(TrainerCallback):
    """One flushed line per logging step (step/total, loss and its parts, learning rate, elapsed, ETA) on the main
    process, readable in a log file where tqdm's bar and the Trainer's bare dicts are not."""

    def __init__(self, stream=None):
        self.stream = stream
        self._start, self._first_step = 0.0, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start, self._first_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        elapsed = time.perf_counter() - self._start
        if "loss" in logs:
            line = progress_line(
                state.global_step, state.max_steps, elapsed, state.global_step - self._first_step, logs["loss"],
                logs, logs.get("learning_rate"),
            )  # fmt: skip
        elif "train_runtime" in logs:
            line = f"training done: {state.global_step} steps in {format_duration(logs['train_runtime'])}"
        else:
            line = "  ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in logs.items())
        print(line, file=self.stream or sys.stdout, flush=True)
