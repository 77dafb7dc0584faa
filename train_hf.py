"""Train GSVA with the Hugging Face Trainer (LoRA, DeepSpeed, torchrun/accelerate), then export and evaluate.

Every `TrainingArguments` flag works. Defaults are GSVA's recipe: LoRA r=8 / alpha 16 / dropout 0.05 on the
LLM's q_proj and v_proj; `embed_tokens`, `lm_head`, SAM's mask decoder and `text_hidden_fcs` fully trained;
AdamW lr 3e-4, betas (0.9, 0.95), 100 warm-up steps then linear decay, gradient clipping 1.0.

    python train_hf.py configs/train-tiny-synthetic.json          # the embedded default (CPU, minutes)
    python train_hf.py --model_name_or_path DIR --dataset_dir DATA --output_dir OUT --bf16 \
        --deepspeed configs/deepspeed_zero2.json --gradient_checkpointing ...
    python train_hf.py --export_only --resume_from_checkpoint OUT/checkpoint-500 --output_dir OUT ...
"""

import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, PretrainedConfig, TrainingArguments, set_seed

from configuration_gsva import GSVAConfig
from gsva_hf.data.collator import GSVACollator
from gsva_hf.training import (
    GSVATrainer,
    TimedEvaluationCallback,
    check_embedding_init_std,
    count_parameters,
    draw_input_embeddings,
    draw_language_model,
    export_model,
    folder_has_weights,
    merged_model,
    prepare_for_training,
)
from modeling_gsva import GSVAForCausalLM
from processing_gsva import GSVAProcessor

logger = logging.getLogger("train_hf")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="configs/gsva-tiny",
        metadata={"help": "GSVA folder with weights, or a preset folder with only a config (random init)"},
    )
    lora_r: int = field(default=8, metadata={"help": ">0 LoRA rank on the LLM; 0 LLM frozen; <0 the whole LLM trains"})
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str = field(default="q_proj,v_proj", metadata={"help": "LLM modules that get LoRA"})
    train_vision_tower: bool = field(default=False, metadata={"help": "also train CLIP (from-scratch models)"})
    train_projector: bool = field(default=False, metadata={"help": "also train the projector"})
    train_sam_encoder: bool = field(default=False, metadata={"help": "also train SAM's image encoder"})
    train_prompt_encoder: bool = field(default=False, metadata={"help": "also train SAM's prompt encoder"})
    ce_loss_weight: float = 1.0
    bce_loss_weight: float = 2.0
    dice_loss_weight: float = 0.5
    seg_rej_ce_weight: float = field(
        default=1.0, metadata={"help": "CE weight of [SEG]/[REJ] answer tokens (1.0 = original; >1 learns rejection faster)"}
    )
    attn_implementation: str = "sdpa"
    config_overrides: str = field(
        default="",
        metadata={
            "help": "presets without weights: change config values, e.g. "
            "'vision_feature_layer=-1,text_config.num_hidden_layers=4' (sub-configs by dotted name)"
        },
    )
    embedding_init_std: float | None = field(
        default=None,
        metadata={
            "help": "presets without weights: draw the language model's input embeddings with this std instead of "
            "text_config.initializer_range (a tiny LM needs ~1.0 for words to stay visible after attention)"
        },
    )
    lm_init_std: float | None = field(
        default=None,
        metadata={
            "help": "presets without weights: redraw the language model's linear layers and embeddings (or only "
            "--lm_init_modules) with this std instead of text_config.initializer_range"
        },
    )
    lm_init_modules: str = field(
        default="", metadata={"help": "with --lm_init_std: only layers whose names end so, e.g. q_proj,k_proj,v_proj,o_proj"}
    )


@dataclass
class DataArguments:
    dataset_dir: str = field(default="data/synthetic", metadata={"help": "GSVA's data tree (holds refer_seg/, ...)"})
    dataset: str = "sem_seg||refer_seg||vqa||reason_seg"
    sample_rates: str = "9,3,3,1"
    sem_seg_data: str = "ade20k||cocostuff||pascal_part||paco_lvis||mapillary"
    refer_seg_data: str = "refclef||refcoco||refcoco+||refcocog"
    vqa_data: str = "llava_instruct_150k"
    reason_seg_data: str = "ReasonSeg|train"
    explanatory: float = 0.1
    num_classes_per_sample: int = 3
    no_sampling: bool = False
    samples_per_epoch: int = field(default=0, metadata={"help": "0: batch x accumulation x max_steps x processes"})
    val_dataset: str = field(default="grefcoco|unc|val", metadata={"help": "evaluated after training ('' to skip)"})
    eval_mode: str = field(default="teacher_forced", metadata={"help": "teacher_forced or generate"})
    eval_batch_size: int = 8
    make_synthetic_data: bool = field(
        default=False, metadata={"help": "write the synthetic gRefCOCO task into dataset_dir when it is missing"}
    )
    synthetic_train_images: int = 4000
    synthetic_val_images: int = 250
    synthetic_negative_kinds: str = field(
        default="",
        metadata={
            "help": "synthetic train split: how often each kind of hard negative is drawn, e.g. "
            "'color=2,shape=1,both=1' (default: all candidates alike); val is never changed"
        },
    )


@dataclass
class GSVATrainingArguments(TrainingArguments):
    output_dir: str = "outputs/gsva"
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = 0.0
    warmup_steps: float = 100
    lr_scheduler_type: str = "linear"
    max_grad_norm: float = 1.0
    logging_steps: float = 10
    remove_unused_columns: bool = False
    save_safetensors: bool = True
    export_dir: str = field(default="", metadata={"help": "merged model folder (default: OUTPUT_DIR/final)"})
    export_only: bool = field(default=False, metadata={"help": "only merge and export resume_from_checkpoint"})
    max_shard_size: str = "5GB"
    torch_threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: leave as is)"})
    mask_head_learning_rate: float | None = field(
        default=None, metadata={"help": "learning rate of SAM and text_hidden_fcs (default: learning_rate, as GSVA)"}
    )
    embedding_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "learning rate of the language model's input embeddings (default: learning_rate, as GSVA); "
            "with --embedding_init_std S, learning_rate*S/0.02 keeps their relative pace. Setting or dropping it "
            "(or --mask_head_learning_rate) changes the optimizer's groups: resume with the flags of the first run"
        },
    )
    eval_at_minutes: str = field(
        default="", metadata={"help": "learning curve: evaluate val_dataset at these training minutes, e.g. 5,10,20,30"}
    )
    vision_pretrain_steps: int = field(
        default=0,
        metadata={
            "help": "synthetic task, from-scratch CLIP: first train CLIP and the projector this many steps to tell "
            "what the image holds (0: off, as GSVA, whose CLIP comes pretrained)"
        },
    )
    vision_pretrain_target: str = field(
        default="image",
        metadata={
            "help": "image: which colour+shape pairs each image holds; patches: the colour+shape under each patch; "
            "both: the two together"
        },
    )
    vision_pretrain_learning_rate: float = 1e-3
    vision_pretrain_batch_size: int = 32


def load_model(model_args: ModelArguments, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """Weights when the folder has them; a config-only preset gives a random model (tests, synthetic task, GPU
    benchmarks), drawn directly on `device`: drawing GSVA-7B on the CPU under torchrun's one thread per process
    outlasted a 290 s GPU check."""
    path = Path(model_args.model_name_or_path)
    overrides = {
        "ce_loss_weight": model_args.ce_loss_weight,
        "bce_loss_weight": model_args.bce_loss_weight,
        "dice_loss_weight": model_args.dice_loss_weight,
        "seg_rej_ce_weight": model_args.seg_rej_ce_weight,
    }
    if folder_has_weights(path):
        model = GSVAForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=model_args.attn_implementation)
        for key, value in overrides.items():
            setattr(model.config, key, value)
    else:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model_name_or_path {path}: no config.json (give a GSVA folder or a preset)")
        config = GSVAConfig.from_pretrained(path, **overrides)
        apply_config_overrides(config, model_args.config_overrides)
        with torch.device(device):
            model = GSVAForCausalLM._from_config(config, attn_implementation=model_args.attn_implementation, dtype=dtype)
        if model_args.lm_init_std is not None:
            draw_language_model(model, model_args.lm_init_std, model_args.lm_init_modules)
        if model_args.embedding_init_std is not None:
            draw_input_embeddings(model, model_args.embedding_init_std)
    processor = GSVAProcessor.from_pretrained(path)
    processor.check_config(model.config)
    return model, processor


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


def check_from_scratch_options(model_args: ModelArguments, training_args: GSVATrainingArguments) -> None:
    """`--config_overrides` and the vision stage are for presets without weights; the stage's result must also
    reach checkpoints (LoRA saves only what trains)."""
    steps = training_args.vision_pretrain_steps
    if steps < 0:
        raise ValueError(f"--vision_pretrain_steps must be >= 0, got {steps}")
    from gsva_hf.vision_pretraining import TARGETS

    if training_args.vision_pretrain_target not in TARGETS:
        raise ValueError(
            f"--vision_pretrain_target must be one of {sorted(TARGETS)}, got {training_args.vision_pretrain_target!r}"
        )
    path = Path(model_args.model_name_or_path)
    if folder_has_weights(path):
        if steps:
            raise ValueError(
                f"--vision_pretrain_steps is for presets without weights, but {path} holds weights (to fine-tune it "
                "with configs/train-tiny-synthetic.json add --vision_pretrain_steps 0 --config_overrides '')"
            )
        if model_args.config_overrides:
            raise ValueError(f"--config_overrides applies to presets without weights, but {path} holds weights")
        for flag in ("embedding_init_std", "lm_init_std"):
            if getattr(model_args, flag) is not None:
                raise ValueError(f"--{flag} applies to presets without weights, but {path} holds weights")
    if model_args.lm_init_modules and model_args.lm_init_std is None:
        raise ValueError("--lm_init_modules only applies with --lm_init_std")
    if model_args.lm_init_std is not None:
        check_embedding_init_std(model_args.lm_init_std, "--lm_init_std")
    if model_args.embedding_init_std is not None:
        check_embedding_init_std(model_args.embedding_init_std)
    if training_args.vision_pretrain_target != "image" and not steps:
        raise ValueError("--vision_pretrain_target only applies with --vision_pretrain_steps > 0")
    if steps and model_args.lora_r > 0 and not (model_args.train_vision_tower and model_args.train_projector):
        raise ValueError(
            "--vision_pretrain_steps with LoRA needs --train_vision_tower true --train_projector true, "
            "or checkpoints would not hold the pretrained tower and a resumed or exported model would lose it"
        )


OWN_RATE_FLAGS = ("mask_head_learning_rate", "embedding_learning_rate")


def check_own_learning_rates(training_args: GSVATrainingArguments) -> None:
    """The extra learning rates must be usable numbers and must reach the optimizer: a DeepSpeed config with its own
    optimizer or scheduler would build param groups the Trainer never splits, silently dropping them."""
    given = [flag for flag in OWN_RATE_FLAGS if getattr(training_args, flag) is not None]
    for flag in given:
        rate = getattr(training_args, flag)
        if not (math.isfinite(rate) and rate >= 0):
            raise ValueError(f"--{flag} must be a finite number >= 0, got {rate}")
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


def pretrain_vision_tower(model, processor, data_args: DataArguments, training_args: GSVATrainingArguments) -> float:
    """Run the vision pretraining stage; write its report to OUTPUT_DIR/vision_pretraining.json; return its seconds."""
    from gsva_hf.vision_pretraining import pretrain_vision

    report = pretrain_vision(
        model,
        processor.image_processor,
        data_args.dataset_dir,
        training_args.vision_pretrain_steps,
        batch_size=training_args.vision_pretrain_batch_size,
        learning_rate=training_args.vision_pretrain_learning_rate,
        seed=training_args.seed,
        target=training_args.vision_pretrain_target,
    )
    logger.info("vision pretraining: %s", report)
    if training_args.process_index == 0:
        output_dir = Path(training_args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "vision_pretraining.json").write_text(json.dumps(report, indent=2) + "\n")
    return report["seconds"]


def build_train_dataset(data_args: DataArguments, samples_per_epoch: int, seed: int):
    from gsva_hf.data.mixed import MixedTrainingDataset

    return MixedTrainingDataset(
        data_args.dataset_dir,
        datasets=data_args.dataset,
        sample_rates=data_args.sample_rates,
        samples_per_epoch=samples_per_epoch,
        seed=seed,
        no_sampling=data_args.no_sampling,
        num_classes_per_sample=data_args.num_classes_per_sample,
        sem_seg_data=data_args.sem_seg_data,
        refer_seg_data=data_args.refer_seg_data,
        vqa_data=data_args.vqa_data,
        reason_seg_data=data_args.reason_seg_data,
        explanatory=data_args.explanatory,
    )


def ensure_synthetic_data(data_args: DataArguments) -> None:
    """Write the synthetic task when asked and missing; when present, it must have been written with the asked
    settings (a silently reused older task would make the run's numbers about other data)."""
    from gsva_hf.data.synthetic import MANIFEST_NAME, parse_negative_kinds, write_synthetic_grefcoco

    negative_kinds = parse_negative_kinds(data_args.synthetic_negative_kinds, "--synthetic_negative_kinds")
    if not data_args.make_synthetic_data:
        if negative_kinds is not None:
            raise ValueError("--synthetic_negative_kinds applies only with --make_synthetic_data")
        return
    root = Path(data_args.dataset_dir)
    wanted = {
        "train images": data_args.synthetic_train_images,
        "val images": data_args.synthetic_val_images,
        "train negative_kinds": negative_kinds,
    }
    if (root / "refer_seg" / "grefcoco" / "grefs(unc).json").is_file():
        manifest = root / MANIFEST_NAME
        if not manifest.is_file():
            raise FileExistsError(
                f"--make_synthetic_data: {root} holds a gRefCOCO tree not written by the synthetic generator (no "
                f"{MANIFEST_NAME}); give another --dataset_dir"
            )
        parameters = json.loads(manifest.read_text())["parameters"]
        found = {
            "train images": parameters["num_images"]["train"],
            "val images": parameters["num_images"]["val"],
            "train negative_kinds": parameters["split_options"]["train"].get("negative_kinds"),
        }
        differing = {key: (found[key], wanted[key]) for key in wanted if found[key] != wanted[key]}
        if differing:
            detail = "; ".join(f"{key}: {have!r} there, {want!r} asked" for key, (have, want) in differing.items())
            raise ValueError(
                f"--make_synthetic_data: {manifest} was written with other settings ({detail}); give another "
                "--dataset_dir or remove that one"
            )
        return
    logger.info("writing the synthetic gRefCOCO task into %s", root)
    write_synthetic_grefcoco(
        root,
        num_images={"train": data_args.synthetic_train_images, "val": data_args.synthetic_val_images, "testA": 0, "testB": 0},
        split_options={"train": {"negative_kinds": negative_kinds}} if negative_kinds is not None else None,
    )


def evaluate_after_training(model, processor, data_args: DataArguments, output_dir: Path, accelerator=None) -> dict | None:
    if not data_args.val_dataset:
        return None
    from gsva_hf.data.mixed import build_val_dataset
    from gsva_hf.evaluation import evaluate_dataset

    dataset = build_val_dataset(data_args.dataset_dir, data_args.val_dataset)
    result = evaluate_dataset(
        model, processor, dataset, mode=data_args.eval_mode, batch_size=data_args.eval_batch_size, accelerator=accelerator
    )
    if accelerator is None or accelerator.is_main_process:
        print(result.log_line, flush=True)
        payload = {"val_dataset": data_args.val_dataset, "mode": data_args.eval_mode, "metrics": result.metrics}
        (output_dir / "eval_results.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return result.metrics


def json_to_args(path: str) -> list[str]:
    """A JSON file of arguments as command-line flags, so flags after it override the file."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"cannot read the arguments file {path}: {error}") from error
    if not isinstance(values, dict):
        raise SystemExit(f"{path}: expected a JSON object of argument names to values")
    flags = []
    for key, value in values.items():
        flags += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    return flags


@dataclass
class TrainingRun:
    """Everything `main` builds before training, so tests and scripts can drive the Trainer themselves."""

    trainer: GSVATrainer
    processor: GSVAProcessor
    model_args: ModelArguments
    data_args: DataArguments
    training_args: GSVATrainingArguments


def parse_arguments(argv=None) -> tuple[ModelArguments, DataArguments, GSVATrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, GSVATrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith(".json"):
        argv = json_to_args(argv[0]) + argv[1:]
    return parser.parse_args_into_dataclasses(args=argv)


def build_run(argv=None) -> TrainingRun:
    model_args, data_args, training_args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING)
    if training_args.torch_threads:
        torch.set_num_threads(training_args.torch_threads)
    torch.set_flush_denormal(True)
    set_seed(training_args.seed)
    with training_args.main_process_first(desc="synthetic data"):
        ensure_synthetic_data(data_args)

    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    check_from_scratch_options(model_args, training_args)
    check_own_learning_rates(training_args)
    model, processor = load_model(
        model_args, dtype if training_args.deepspeed else torch.float32, device=training_args.device
    )
    pretrain_seconds = 0.0
    if training_args.vision_pretrain_steps > 0 and not (training_args.resume_from_checkpoint or training_args.export_only):
        pretrain_seconds = pretrain_vision_tower(model, processor, data_args, training_args)
    trainable = prepare_for_training(
        model,
        lora_r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        lora_target_modules=model_args.lora_target_modules,
        train_vision_tower=model_args.train_vision_tower,
        train_projector=model_args.train_projector,
        train_sam_encoder=model_args.train_sam_encoder,
        train_prompt_encoder=model_args.train_prompt_encoder,
    )
    logger.info("parameters: %s", count_parameters(trainable))
    samples = data_args.samples_per_epoch or max(
        1,
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * max(training_args.max_steps, 1)
        * training_args.world_size,
    )
    trainer = GSVATrainer(
        model=trainable,
        args=training_args,
        train_dataset=build_train_dataset(data_args, samples, training_args.seed),
        data_collator=GSVACollator(processor),
        processing_class=processor,
        mask_head_learning_rate=training_args.mask_head_learning_rate,
        embedding_learning_rate=training_args.embedding_learning_rate,
    )
    if training_args.eval_at_minutes and data_args.val_dataset:
        from gsva_hf.data.mixed import build_val_dataset
        from gsva_hf.evaluation import evaluate_dataset

        val = build_val_dataset(data_args.dataset_dir, data_args.val_dataset)
        minutes = [float(m) for m in training_args.eval_at_minutes.split(",") if m.strip()]

        def curve_metrics(network):
            result = evaluate_dataset(
                network, processor, val, mode=data_args.eval_mode, batch_size=data_args.eval_batch_size, progress=False
            )
            logger.info("curve: %s", result.log_line)
            return result.metrics

        curve = TimedEvaluationCallback(
            minutes, curve_metrics, Path(training_args.output_dir) / "curve.jsonl", start_seconds=pretrain_seconds
        )
        trainer.add_callback(curve)
    return TrainingRun(trainer, processor, model_args, data_args, training_args)


def finish_run(run: TrainingRun) -> dict:
    """Merge LoRA, write the complete model folder, then evaluate it on `val_dataset`."""
    trainer, training_args = run.trainer, run.training_args
    output_dir = Path(training_args.output_dir)
    export_dir = Path(training_args.export_dir or output_dir / "final")
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_args.json").write_text(
            json.dumps({"model": asdict(run.model_args), "data": asdict(run.data_args)}, indent=2) + "\n"
        )
    trainer.accelerator.wait_for_everyone()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    final = merged_model(unwrapped).eval()
    if trainer.is_world_process_zero():
        export_model(final, run.processor, export_dir, max_shard_size=training_args.max_shard_size)
        logger.info("merged model written to %s", export_dir)
    trainer.accelerator.wait_for_everyone()
    metrics = evaluate_after_training(final, run.processor, run.data_args, output_dir, accelerator=trainer.accelerator)
    return metrics or {}


def main(argv=None) -> dict:
    run = build_run(argv)
    checkpoint = run.training_args.resume_from_checkpoint
    if not run.training_args.export_only:
        run.trainer.train(resume_from_checkpoint=checkpoint)
    elif checkpoint:
        run.trainer._load_from_checkpoint(checkpoint)
    else:
        raise ValueError("--export_only needs --resume_from_checkpoint CHECKPOINT_DIR")
    metrics = finish_run(run)
    # Tear the process group down before exit: a gloo group left alive can abort a rank at interpreter shutdown.
    run.trainer.accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
