"""Train GSVA with the Hugging Face Trainer (LoRA, DeepSpeed, torchrun/accelerate), then export and evaluate.

Defaults are GSVA's recipe: LoRA r=8 / alpha 16 / dropout 0.05 on the LLM's q_proj and v_proj; `embed_tokens`,
`lm_head`, SAM's mask decoder and `text_hidden_fcs` fully trained; AdamW lr 3e-4, betas (0.9, 0.95), 100 warm-up
steps then linear decay, gradient clipping 1.0. Every `TrainingArguments` flag also works (`--help-all`).

    python train_hf.py --model_name_or_path DIR --dataset_dir DATA --output_dir OUT
    python train_hf.py --dataset_dir data/synthetic --dataset refer_seg --sample_rates 1 --refer_seg_data grefcoco
    python train_hf.py args.json --max_steps 100        # a JSON file of flags; flags after it override it
    torchrun --nproc_per_node 8 train_hf.py ... --bf16 --deepspeed configs/deepspeed_zero2.json
    python train_hf.py --export_only --resume_from_checkpoint OUT/checkpoint-500 --output_dir OUT ...

An ordinary mistake (a missing path or data source, an unknown split, a bad flag value, an output folder holding an
earlier run, an export folder holding other files) stops the run before the model loads with one line and exit
status 2; a diverged run (a NaN or infinite loss) ends with one line and exit status 1; `--debug` alone shows the
traceback. The functions are the recipe's building blocks: examples/tiny_synthetic/train_tiny.py composes them with
its own options for a model trained from scratch.
"""

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from configuration_gsva import GSVAConfig
from gsva_hf.cli import describe, name_the_cpu_for_deepspeed, usage_errors, write_text_replacing
from gsva_hf.cpu_memory import MALLOC_CHOICES, apply_malloc_choice
from gsva_hf.data.collator import GSVACollator
from gsva_hf.loading import NonFiniteError, check_gsva_folder, from_pretrained_strictly
from gsva_hf.training import (
    BaseModelRecord,
    GSVATrainer,
    ProgressLineCallback,
    check_checkpoint_base,
    check_checkpoint_complete,
    count_parameters,
    export_model,
    folder_has_weights,
    merged_model,
    prepare_for_training,
)
from gsva_hf.training_setup import (
    PROG,
    OneLineErrorParser,
    check_data,
    check_numbers,
    check_output_dir,
    check_own_learning_rates,
    json_to_args,
    project_help,
    split_debug,
)
from modeling_gsva import GSVAForCausalLM
from processing_gsva import GSVAProcessor

logger = logging.getLogger("train_hf")


def flag(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class ModelArguments:
    model_name_or_path: str = flag("configs/gsva-tiny", "GSVA folder with weights, or a preset folder (config only: random init)")
    lora_r: int = flag(8, ">0: LoRA rank on the LLM; 0: LLM frozen; <0: the whole LLM trains")
    lora_alpha: int = flag(16, "LoRA alpha")
    lora_dropout: float = flag(0.05, "LoRA dropout")
    lora_target_modules: str = flag("q_proj,v_proj", "LLM modules that get LoRA (comma-separated)")
    train_vision_tower: bool = flag(False, "also train CLIP")
    train_projector: bool = flag(False, "also train the projector")
    train_sam_encoder: bool = flag(False, "also train SAM's image encoder")
    train_prompt_encoder: bool = flag(False, "also train SAM's prompt encoder")
    ce_loss_weight: float = flag(1.0, "weight of the token cross-entropy")
    bce_loss_weight: float = flag(2.0, "weight of the mask BCE")
    dice_loss_weight: float = flag(0.5, "weight of the mask Dice loss")
    seg_rej_ce_weight: float = flag(1.0, "CE weight of [SEG]/[REJ] answer tokens (>1 learns rejection faster)")
    attn_implementation: str = flag("sdpa", "attention kernel: sdpa, eager or flash_attention_2")


@dataclass
class DataArguments:
    dataset_dir: str = flag("", "GSVA's data tree (holds refer_seg/, ade20k/, ...); required unless every source is hf:")
    dataset: str = flag("sem_seg||refer_seg||vqa||reason_seg", "training sources, ||-separated")
    sample_rates: str = flag("9,3,3,1", "relative sampling rate of each source")
    sem_seg_data: str = flag("ade20k||cocostuff||pascal_part||paco_lvis||mapillary", "semantic-segmentation sets")
    refer_seg_data: str = flag("refclef||refcoco||refcoco+||refcocog", "referring sets (grefcoco for gRefCOCO)")
    vqa_data: str = flag("llava_instruct_150k", "visual instruction set")
    reason_seg_data: str = flag("ReasonSeg|train", "reasoning-segmentation set and split")
    explanatory: float = flag(0.1, "share of ReasonSeg samples that also ask for an explanation")
    num_classes_per_sample: int = flag(3, "targets per training question")
    no_sampling: bool = flag(False, "use every target instead of sampling num_classes_per_sample")
    samples_per_epoch: int = flag(0, "0: batch x accumulation x max_steps x processes")
    val_dataset: str = flag("grefcoco|unc|val", "evaluated after training ('' to skip)")
    eval_mode: str = flag("teacher_forced", "teacher_forced or generate")
    eval_batch_size: int = flag(8, "batch size of the evaluation")


@dataclass
class GSVATrainingArguments(TrainingArguments):
    output_dir: str = flag("outputs/gsva", "checkpoints, logs and the exported model")
    learning_rate: float = flag(3e-4, "AdamW learning rate (GSVA)")
    adam_beta1: float = flag(0.9, "AdamW beta1 (GSVA)")
    adam_beta2: float = flag(0.95, "AdamW beta2 (GSVA)")
    weight_decay: float = flag(0.0, "AdamW weight decay (GSVA)")
    warmup_steps: float = flag(100, "linear warm-up steps (GSVA)")
    lr_scheduler_type: str = flag("linear", "learning-rate schedule after the warm-up (GSVA)")
    max_grad_norm: float = flag(1.0, "gradient clipping (GSVA)")
    logging_steps: float = flag(10, "steps between progress lines")
    disable_tqdm: bool = flag(True, "the progress lines replace tqdm's bar")
    remove_unused_columns: bool = flag(False, "GSVA's batches need every column")
    save_safetensors: bool = flag(True, "checkpoints as safetensors")
    export_dir: str = flag("", "merged model folder ('': OUTPUT_DIR/final)")
    export_only: bool = flag(False, "only merge and export --resume_from_checkpoint")
    max_shard_size: str = flag("5GB", "largest safetensors shard of the export")
    torch_threads: int = flag(1, "CPU threads per process (0: torch's default); 1 is fastest on a shared machine")
    cpu_malloc: str = flag(
        "keep", "on the CPU, keep: glibc's malloc keeps freed memory for the next step; default: the C library's own",
        choices=list(MALLOC_CHOICES),
    )
    mask_head_learning_rate: float | None = flag(None, "learning rate of SAM and text_hidden_fcs (None: learning_rate)")
    # Pinning needs an accelerator; without one torch warns on every DataLoader, so it is on only where one is.
    dataloader_pin_memory: bool = flag(
        torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()), "pin batches in memory"
    )


PROJECT_DATACLASSES = (ModelArguments, DataArguments, GSVATrainingArguments)


def parse_arguments(argv=None, extra=()) -> tuple:
    """(ModelArguments, DataArguments, GSVATrainingArguments, *extra) from flags, a leading JSON file, or both;
    `--help` lists the project's flags and the Trainer's common ones, `--help-all` every Trainer flag. Mistakes end
    the command with one line and exit 2 (a bare `--debug`: the traceback)."""
    dataclass_types = (ModelArguments, DataArguments, *extra, GSVATrainingArguments)
    name_the_cpu_for_deepspeed()
    argv, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    if "-h" in argv or "--help" in argv:
        print(project_help(dataclass_types))
        raise SystemExit(0)
    with usage_errors(PROG, debug):
        if argv and argv[0].endswith(".json"):
            argv = json_to_args(argv[0]) + argv[1:]
        parser = OneLineErrorParser(dataclass_types)
        parsed = parser.parse_args_into_dataclasses(args=["--help" if a == "--help-all" else a for a in argv])
        check_numbers(*parsed)
    model_args, data_args, *extra_args, training_args = parsed
    training_args.debug_errors = debug
    return (model_args, data_args, training_args, *extra_args)


def setup(training_args: GSVATrainingArguments) -> None:
    """Every run's first step: the output and export folders checked (an earlier run is resumed or refused,
    `check_output_dir`), then logging, line-buffered stdout (progress reaches a log file as it happens), threads
    and the seed."""
    check_output_dir(training_args)
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    if training_args.torch_threads:
        torch.set_num_threads(training_args.torch_threads)
    apply_malloc_choice(training_args.cpu_malloc, training_args.device.type)
    torch.set_flush_denormal(True)
    set_seed(training_args.seed)


def load_model(model_args: ModelArguments, training_args: GSVATrainingArguments, configure=None, initialise=None):
    """Weights when the folder has them, all of them (a missing, unexpected, mis-shaped or non-finite tensor is
    refused, named, as `load_gsva` does); a config-only preset gives a random model, drawn directly on the training
    device (drawing GSVA-7B on the CPU under torchrun's one thread per process is slow). For presets only,
    `configure(config)` runs before the draw and `initialise(model)` after it."""
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    dtype = dtype if training_args.deepspeed else torch.float32
    path = Path(model_args.model_name_or_path)
    if not path.exists() and not path.is_absolute() and (Path(__file__).parent / path).is_dir():
        path = Path(__file__).parent / path  # a preset of this checkout (configs/...), from any working folder
    weights = {name: getattr(model_args, name) for name in ("ce_loss_weight", "bce_loss_weight", "dice_loss_weight", "seg_rej_ce_weight")}
    source = f"--model_name_or_path {path}"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{source}: no config.json (give a GSVA folder or a preset)")
    # As strict as load_gsva: config and weight headers checked before building, and no tensor drawn at random.
    check_gsva_folder(path)
    if folder_has_weights(path):
        model = from_pretrained_strictly(
            GSVAForCausalLM, path, source, dtype=dtype, attn_implementation=model_args.attn_implementation
        )
        for key, value in weights.items():
            setattr(model.config, key, value)
    else:
        config = GSVAConfig.from_pretrained(path, **weights)
        if configure is not None:
            configure(config)
        with torch.device(training_args.device):
            model = GSVAForCausalLM._from_config(config, attn_implementation=model_args.attn_implementation, dtype=dtype)
        if initialise is not None:
            initialise(model)
    processor = GSVAProcessor.from_pretrained(path)
    processor.check_config(model.config)
    return model, processor


def build_train_dataset(data_args: DataArguments, training_args: GSVATrainingArguments):
    from gsva_hf.data.mixed import MixedTrainingDataset

    samples = data_args.samples_per_epoch or max(
        1,
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * max(training_args.max_steps, 1)
        * training_args.world_size,
    )
    return MixedTrainingDataset(
        data_args.dataset_dir, datasets=data_args.dataset, sample_rates=data_args.sample_rates,
        samples_per_epoch=samples, seed=training_args.seed, no_sampling=data_args.no_sampling,
        num_classes_per_sample=data_args.num_classes_per_sample, sem_seg_data=data_args.sem_seg_data,
        refer_seg_data=data_args.refer_seg_data, vqa_data=data_args.vqa_data,
        reason_seg_data=data_args.reason_seg_data, explanatory=data_args.explanatory,
    )  # fmt: skip


@dataclass
class TrainingRun:
    """Everything `main` builds before training, so tests and scripts can drive the Trainer themselves;
    `recorded` goes to OUTPUT_DIR/train_args.json."""

    trainer: GSVATrainer
    processor: GSVAProcessor
    model_args: ModelArguments
    data_args: DataArguments
    training_args: GSVATrainingArguments
    recorded: dict = field(default_factory=dict)


def assemble_run(
    model, processor, model_args, data_args, training_args, trainer_class=GSVATrainer, train_dataset=None, **trainer_kwargs
):
    """Set what trains, build the dataset (unless given) and the Trainer (progress lines instead of bare log dicts)."""
    trainable = prepare_for_training(
        model, lora_r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        lora_target_modules=model_args.lora_target_modules, train_vision_tower=model_args.train_vision_tower,
        train_projector=model_args.train_projector, train_sam_encoder=model_args.train_sam_encoder,
        train_prompt_encoder=model_args.train_prompt_encoder,
    )  # fmt: skip
    logger.info("parameters: %s", count_parameters(trainable))
    trainer = trainer_class(
        model=trainable,
        args=training_args,
        train_dataset=build_train_dataset(data_args, training_args) if train_dataset is None else train_dataset,
        data_collator=GSVACollator(processor),
        processing_class=processor,
        mask_head_learning_rate=training_args.mask_head_learning_rate,
        **trainer_kwargs,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(ProgressLineCallback())
    recorded = {"model": asdict(model_args), "data": asdict(data_args)}
    return TrainingRun(trainer, processor, model_args, data_args, training_args, recorded)


def build_run(argv=None) -> TrainingRun:
    model_args, data_args, training_args = parse_arguments(argv)
    with usage_errors(PROG, training_args.debug_errors):
        setup(training_args)
        check_own_learning_rates(training_args, {"mask_head_learning_rate": training_args.mask_head_learning_rate})
        train_dataset = check_data(data_args, training_args, build_train_dataset)
        model, processor = load_model(model_args, training_args)
    return assemble_run(model, processor, model_args, data_args, training_args, train_dataset=train_dataset)


def evaluate_after_training(model, processor, data_args: DataArguments, output_dir: Path, accelerator=None) -> dict | None:
    if not data_args.val_dataset:
        return None
    from gsva_hf.data.mixed import build_val_dataset
    from gsva_hf.evaluation import evaluate_dataset
    from gsva_hf.metrics import strict_json

    dataset = build_val_dataset(data_args.dataset_dir, data_args.val_dataset)
    result = evaluate_dataset(
        model, processor, dataset, mode=data_args.eval_mode, batch_size=data_args.eval_batch_size, accelerator=accelerator
    )
    if accelerator is None or accelerator.is_main_process:
        print(result.log_line, flush=True)
        payload = {"val_dataset": data_args.val_dataset, "mode": data_args.eval_mode, "metrics": result.metrics}
        record = output_dir / "eval_results.json"
        write_text_replacing(record, strict_json(payload, str(record)) + "\n")
    return result.metrics


def finish_run(run: TrainingRun) -> dict:
    """Merge LoRA, write the complete model folder, then evaluate it on `val_dataset`."""
    trainer, training_args = run.trainer, run.training_args
    output_dir = Path(training_args.output_dir)
    export_dir = Path(training_args.export_dir or output_dir / "final")
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_replacing(output_dir / "train_args.json", json.dumps(run.recorded, indent=2, allow_nan=False) + "\n")
    trainer.accelerator.wait_for_everyone()
    final = merged_model(trainer.accelerator.unwrap_model(trainer.model)).eval()
    if trainer.is_world_process_zero():
        export_model(final, run.processor, export_dir, max_shard_size=training_args.max_shard_size)
        logger.info("merged model written to %s", export_dir)
    trainer.accelerator.wait_for_everyone()
    metrics = evaluate_after_training(final, run.processor, run.data_args, output_dir, accelerator=trainer.accelerator)
    return metrics or {}


def train_and_finish(run: TrainingRun) -> dict:
    """Train (or, with --export_only, load the checkpoint), export, evaluate. A checkpoint to resume or export is
    checked first: complete, and trained from this --model_name_or_path (`check_checkpoint_base`); the run's own
    checkpoints record that base (`BaseModelRecord`)."""
    checkpoint = run.training_args.resume_from_checkpoint
    with usage_errors(PROG, getattr(run.training_args, "debug_errors", False)):
        base = BaseModelRecord.of(run.trainer.model, run.model_args.model_name_or_path)
        if isinstance(checkpoint, (str, Path)):
            check_checkpoint_base(checkpoint, check_checkpoint_complete(checkpoint), base)
    run.trainer.add_callback(base)
    if run.training_args.export_only:
        run.trainer._load_from_checkpoint(checkpoint)
    else:
        run.trainer.train(resume_from_checkpoint=checkpoint)
    metrics = finish_run(run)
    # Tear the process group down before exit: a gloo group left alive can abort a rank at interpreter shutdown.
    run.trainer.accelerator.end_training()
    return metrics


def main(argv=None) -> dict:
    """The command: a diverged run (a NaN or infinite loss, gradient or exported weight) ends with one line and
    exit status 1, its traceback only with --debug."""
    run = build_run(argv)
    try:
        return train_and_finish(run)
    except NonFiniteError as error:
        if getattr(run.training_args, "debug_errors", False):
            raise
        print(f"{PROG}: error: {describe(error)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
