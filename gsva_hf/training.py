"""What trains, LoRA, the Trainer subclass that logs GSVA's loss parts, and the merged export.

GSVA's recipe (`model/prepare_model_tokenizer.py`): everything frozen, LoRA on the LLM's q/v projections,
`embed_tokens`, `lm_head`, SAM's mask decoder and `text_hidden_fcs` fully trained; CLIP, the projector and
SAM's image and prompt encoders frozen. Flags open the frozen parts for a from-scratch tiny model.
"""

import errno
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

FULLY_TRAINED = ("lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs")
OPTIONAL_MODULES = {
    "train_vision_tower": "vision_tower",
    "train_projector": "multi_modal_projector",
    "train_sam_encoder": "vision_encoder",
    "train_prompt_encoder": "prompt_encoder",
}


def lora_target_regex(target_modules: list[str] | str) -> str:
    """Regex selecting only the LLM's projections: a plain list would also hit CLIP's and SAM's q/v_proj."""
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    names = [n.strip() for part in names for n in part.split(",") if n.strip()]
    if not names:
        raise ValueError("lora_target_modules is empty; give module names such as q_proj,v_proj")
    return r".*language_model\..*\.(" + "|".join(re.escape(n) for n in names) + r")"


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
    full_modules = list(FULLY_TRAINED) + [OPTIONAL_MODULES[f] for f, on in flags.items() if on]
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
        return get_peft_model(model, config)
    if lora_r < 0:
        full_modules.append("language_model")
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
    plain.config.use_cache = True
    plain.save_pretrained(output_dir, max_shard_size=max_shard_size)
    processor.save_pretrained(output_dir)
    return output_dir


def is_mask_head(name: str) -> bool:
    """SAM (any part) and `text_hidden_fcs`: the modules that turn `[SEG]` states into masks."""
    return ".sam." in f".{name}" or "text_hidden_fcs" in name


class GSVATrainer(Trainer):
    """Trainer that logs GSVA's CE, BCE and Dice parts (averaged over the logging window) and can give the mask
    head (`mask_head_learning_rate`) and the language model's input embeddings (`embedding_learning_rate`) their own
    learning rates; None keeps GSVA's single rate."""

    def __init__(
        self,
        *args,
        mask_head_learning_rate: float | None = None,
        embedding_learning_rate: float | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.mask_head_learning_rate = mask_head_learning_rate
        self.embedding_learning_rate = embedding_learning_rate
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
        if self.embedding_learning_rate is not None:
            embeddings = model.get_input_embeddings().weight
            if not embeddings.requires_grad:
                raise ValueError("--embedding_learning_rate is set but the input embeddings do not train")
            if embeddings is getattr(model.get_output_embeddings(), "weight", None):
                raise ValueError(
                    "--embedding_learning_rate: the input embeddings are tied to lm_head, which would share the rate"
                )
            rates[id(embeddings)] = ("embedding_learning_rate", self.embedding_learning_rate)
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
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:
            if self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            if is_disk_full(error):
                free = shutil.disk_usage(os.path.dirname(folder) or ".").free
                raise OSError(
                    errno.ENOSPC,
                    f"no space left on device while saving checkpoint {folder} ({free / 2**20:.0f} MiB free; the "
                    f"partial checkpoint was removed): {error}",
                ) from error
            error.add_note(f"while saving checkpoint {folder} (the partial checkpoint was removed)")
            raise

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            for name in ("ce_loss", "mask_bce_loss", "mask_dice_loss"):
                value = getattr(outputs, name, None)
                if value is not None:
                    self._part_sums[name] = self._part_sums.get(name, 0.0) + float(value.detach())
            self._part_count += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._part_count and "loss" in logs:
            for name, total in self._part_sums.items():
                logs[name] = round(total / self._part_count, 6)
            self._part_sums, self._part_count = {}, 0
        super().log(logs, start_time)


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


def check_embedding_init_std(std: float, flag: str = "--embedding_init_std") -> None:
    if not (std > 0 and math.isfinite(std)):
        raise ValueError(f"{flag} must be a positive finite number, got {std}")


def draw_input_embeddings(model, std: float, flag: str = "--embedding_init_std") -> None:
    """Redraw a from-scratch language model's input embeddings with `std` (all rows, padding included): at the
    preset's 0.02 a 128-wide model's words are ~5x smaller than its first attention output (BENCHMARKS.md)."""
    check_embedding_init_std(std, flag)
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=std)


def draw_language_model(
    model, std: float, modules: str | list[str] = "", generator: torch.Generator | None = None, flag: str = "--lm_init_std"
) -> None:
    """Redraw a from-scratch language model's linear layers and embeddings with `std` (biases zero), or only the
    layers whose names end with one of `modules` (names or comma-separated names, e.g. `q_proj,k_proj`). The preset's 0.02 is Llama's choice for width
    4,096; at the tiny width 128 attention starts near uniform, and the presence probe's lookup did not form until
    the attention projections were drawn at 1/sqrt(width) (BENCHMARKS.md, "Sixth session")."""
    check_embedding_init_std(std, flag)
    parts = [modules] if isinstance(modules, str) else list(modules)
    modules = tuple(name.strip() for part in parts for name in part.split(",") if name.strip())
    named = list(model.language_model.named_modules())
    unmatched = [end for end in modules if not any(name.endswith(end) for name, _ in named)]
    if unmatched:
        raise ValueError(f"{flag.replace('std', 'modules')}: no language-model layer ends with {unmatched}")
    with torch.no_grad():
        for name, module in named:
            if modules and not name.endswith(modules):
                continue
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(module.weight, std=std, generator=generator)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.zeros_(module.bias)


def count_parameters(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


class TimedEvaluationCallback(TrainerCallback):
    """Evaluate when the training clock (evaluation time excluded) passes each mark, for learning curves.

    Appends one JSON line per evaluation to `curve_path`: minutes, step, samples seen, the losses of the last
    logging window and the metrics. `start_seconds` is training done before the Trainer (vision pretraining), so
    the clock counts it; marks it already passes are dropped (nothing of the Trainer's run to evaluate yet).
    """

    def __init__(self, minutes: list[float], evaluate, curve_path: str | Path, start_seconds: float = 0.0):
        self.marks = sorted(m for m in minutes if 60 * m > start_seconds)
        self.evaluate = evaluate
        self.curve_path = Path(curve_path)
        self.training_seconds = float(start_seconds)
        self._last = None
        self._last_losses: dict = {}

    def on_step_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.training_seconds += time.perf_counter() - self._last
        if self.marks and self.training_seconds >= 60 * self.marks[0]:
            minute = self.marks.pop(0)
            self._record(minute, args, state, model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._last_losses = {k: logs[k] for k in ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss") if k in logs}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._record(round(self.training_seconds / 60, 2), args, state, model, final=True)

    def _record(self, minute, args, state, model, final=False):
        if not state.is_world_process_zero and args.world_size > 1:
            return
        network = model.get_base_model() if hasattr(model, "get_base_model") else model
        was_training = network.training
        network.eval()
        metrics = self.evaluate(network)
        network.train(was_training)
        entry = {
            "minutes": minute,
            "final": final,
            "step": state.global_step,
            "samples": state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
            **self._last_losses,
            **{k: metrics[k] for k in ("giou", "ciou", "n_acc", "t_acc") if k in metrics},
        }
        self.curve_path.parent.mkdir(parents=True, exist_ok=True)
        with self.curve_path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
