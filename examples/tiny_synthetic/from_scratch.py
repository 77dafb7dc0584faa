"""What a tiny GSVA trained from scratch needs and a pretrained GSVA does not: config changes before the draw, the
language model drawn at another scale, the input embeddings' own learning rate, and a learning curve by minutes."""

import math
import time
from pathlib import Path

import torch
from transformers import PretrainedConfig, TrainerCallback

from configuration_gsva import GSVAConfig
from examples.tiny_synthetic.vision_pretraining import vision_parts
from gsva_hf.metrics import strict_json
from gsva_hf.training import GSVATrainer


def apply_config_overrides(config: GSVAConfig, overrides: str) -> None:
    """`key=value,...` onto `config`; `text_config.x`, `vision_config.x`, `sam_config.vision_config.x` reach
    sub-configs. Values are parsed like `PretrainedConfig.update_from_string`; unknown keys are errors, and the
    result must still pass GSVAConfig's own checks."""
    for item in filter(None, (part.strip() for part in overrides.split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or "=" in value:
            raise ValueError(f"--config_overrides: expected key=value, got {item!r}")
        *parents, leaf = key.split(".")
        target = config
        for name in parents:
            target = getattr(target, name, None)
            if not isinstance(target, PretrainedConfig):
                raise ValueError(f"--config_overrides {key}: {name!r} is not a sub-config of the GSVA config")
        if not hasattr(target, leaf) or leaf == "model_type":
            raise ValueError(f"--config_overrides {key}: the config has no settable {leaf!r}")
        try:
            target.update_from_string(f"{leaf}={value}")
        except (TypeError, ValueError) as error:
            raise ValueError(f"--config_overrides {item}: {error}") from error
    try:
        GSVAConfig(**config.to_dict())
    except (TypeError, ValueError) as error:
        raise ValueError(f"--config_overrides {overrides!r} gives an invalid GSVA config: {error}") from error


def check_init_std(std: float, flag: str = "--embedding_init_std") -> None:
    if not (std > 0 and math.isfinite(std)):
        raise ValueError(f"{flag} must be a positive finite number, got {std}")


def draw_input_embeddings(model, std: float, flag: str = "--embedding_init_std") -> None:
    """Redraw a from-scratch language model's input embeddings with `std` (all rows, padding included): at the
    preset's 0.02 a 128-wide model's words are ~5x smaller than its first attention output."""
    check_init_std(std, flag)
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=std)


def _redraw(module: torch.nn.Linear | torch.nn.Embedding, std: float, generator: torch.Generator | None = None) -> None:
    """One layer of a from-scratch redraw: weight from N(0, std), a linear layer's bias zero."""
    torch.nn.init.normal_(module.weight, std=std, generator=generator)
    if isinstance(module, torch.nn.Linear) and module.bias is not None:
        torch.nn.init.zeros_(module.bias)


def draw_language_model(
    model, std: float, modules: str | list[str] = "", generator: torch.Generator | None = None, flag: str = "--lm_init_std"
) -> None:
    """Redraw a from-scratch language model's linear layers and embeddings with `std` (biases zero), or only the
    layers whose names end with one of `modules` (names or comma-separated names, e.g. `q_proj,k_proj`). The
    preset's 0.02 is Llama's choice for width 4,096; at the tiny width 128 attention starts near uniform, and the
    presence lookup did not form until the attention projections were drawn at 1/sqrt(width)."""
    check_init_std(std, flag)
    parts = [modules] if isinstance(modules, str) else list(modules)
    modules = tuple(name.strip() for part in parts for name in part.split(",") if name.strip())
    # The decoder's layers and embeddings, then the head's `lm_head` (the order the draws have always taken).
    named = [*model.language_model.named_modules(), ("lm_head", model.get_output_embeddings())]
    unmatched = [end for end in modules if not any(name.endswith(end) for name, _ in named)]
    if unmatched:
        raise ValueError(f"{flag.replace('std', 'modules')}: no language-model layer ends with {unmatched}")
    with torch.no_grad():
        for name, module in named:
            if modules and not name.endswith(modules):
                continue
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                _redraw(module, std, generator)


def draw_vision_tower(model, std: float, flag: str = "--vision_init_std") -> None:
    """Redraw a from-scratch vision tower's linear layers with `std` (biases zero; the patch embedding and norms
    stay). Qwen-VL's towers draw 0.02 whatever their width: at width 64 their first attention is near uniform, so
    patches learn their colour at once and the shapes, which need their neighbours, barely at all."""
    check_init_std(std, flag)
    with torch.no_grad():
        for part in vision_parts(model):
            for module in part.modules():
                if isinstance(module, torch.nn.Linear):
                    _redraw(module, std)


def check_mask_loss_boost(factor: float, steps: int) -> None:
    if not (factor > 0 and math.isfinite(factor)):
        raise ValueError(f"--mask_loss_boost must be a positive finite number, got {factor}")
    if steps < 0:
        raise ValueError(f"--mask_loss_boost_steps must be >= 0, got {steps}")
    if factor != 1.0 and steps == 0:
        raise ValueError(f"--mask_loss_boost {factor} needs --mask_loss_boost_steps > 0 (the steps it lasts)")


class TinyTrainer(GSVATrainer):
    """GSVATrainer that can also give the language model's input embeddings their own learning rate
    (`embedding_learning_rate`; None keeps the single rate) and weight the mask losses `mask_loss_boost` times for
    the first `mask_loss_boost_steps` optimizer steps. The boost only scales the loss that is backpropagated: the
    config's weights, the logged losses and every saved config stay the model's own."""

    def __init__(
        self, *args, embedding_learning_rate: float | None = None, mask_loss_boost: float = 1.0, mask_loss_boost_steps: int = 0,
        **kwargs,
    ):
        check_mask_loss_boost(mask_loss_boost, mask_loss_boost_steps)
        super().__init__(*args, **kwargs)
        self.embedding_learning_rate = embedding_learning_rate
        self.mask_loss_boost = mask_loss_boost
        self.mask_loss_boost_steps = mask_loss_boost_steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and self.state.global_step < self.mask_loss_boost_steps:
            masks = [part for part in (outputs.mask_bce_loss, outputs.mask_dice_loss) if part is not None]
            loss = loss + (self.mask_loss_boost - 1.0) * sum(masks)
        return (loss, outputs) if return_outputs else loss

    def _own_learning_rates(self, model) -> dict[int, tuple[str, float]]:
        rates = super()._own_learning_rates(model)
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


class TimedEvaluationCallback(TrainerCallback):
    """Evaluate when the training clock (evaluation time excluded) passes each mark, for learning curves.

    Appends one JSON line per evaluation to `curve_path`: minutes, step, samples seen, the losses of the last
    logging window and the metrics. `start_seconds` is training done before the Trainer (the vision stage), so
    the clock counts it; marks it already passes are dropped (nothing of the Trainer's run to evaluate yet).
    Each mark also saves a checkpoint (its row names it; `save_total_limit` still rotates them) unless saving is
    off, so the model of a row can be evaluated again; `stop_after_last` ends training at the last mark, for runs
    whose length is the curve's.
    """

    def __init__(
        self, minutes: list[float], evaluate, curve_path: str | Path, start_seconds: float = 0.0, stop_after_last: bool = False
    ):
        self.marks = sorted(m for m in minutes if 60 * m > start_seconds)
        self.evaluate = evaluate
        self.curve_path = Path(curve_path)
        self.training_seconds = float(start_seconds)
        self.stop_after_last = stop_after_last
        self._last = None
        self._last_losses: dict = {}
        self._recorded_step = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.training_seconds += time.perf_counter() - self._last
        if self.marks and self.training_seconds >= 60 * self.marks[0]:
            minute = self.marks.pop(0)
            self._record(minute, args, state, model)
            control.should_save = args.save_strategy != "no"
            if self.stop_after_last and not self.marks:
                control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._last_losses = {k: logs[k] for k in ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss") if k in logs}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._recorded_step != state.global_step:
            self._record(round(self.training_seconds / 60, 2), args, state, model, final=True)

    def _record(self, minute, args, state, model, final=False):
        if not state.is_world_process_zero and args.world_size > 1:
            return
        network = model.get_base_model() if hasattr(model, "get_base_model") else model
        was_training = network.training
        network.eval()
        metrics = self.evaluate(network)
        network.train(was_training)
        self._recorded_step = state.global_step
        entry = {
            "minutes": minute,
            "final": final,
            "step": state.global_step,
            "checkpoint": None if final or args.save_strategy == "no" else f"checkpoint-{state.global_step}",
            "samples": state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
            **self._last_losses,
            **{k: metrics[k] for k in ("giou", "ciou", "n_acc", "t_acc") if k in metrics},
        }
        self.curve_path.parent.mkdir(parents=True, exist_ok=True)
        with self.curve_path.open("a") as handle:
            handle.write(strict_json(entry, str(self.curve_path), indent=None) + "\n")
