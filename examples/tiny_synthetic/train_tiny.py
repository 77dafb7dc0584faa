"""Train the tiny GSVA from scratch on the synthetic coloured-shapes task: train_hf.py's recipe plus what a model
without pretrained parts needs (README.md beside this file).

    python examples/tiny_synthetic/train_tiny.py examples/tiny_synthetic/config.json     # the bundled model
    python examples/tiny_synthetic/train_tiny.py examples/tiny_synthetic/config.json --max_steps 100 --output_dir out/t

Its own flags (`--help` lists them with train_hf.py's): writing the task (`--make_synthetic_data`), config changes
before the random draw (`--config_overrides`), the language model drawn at another scale (`--lm_init_std`,
`--embedding_init_std`), a vision stage that stands in for CLIP's pretraining (`--vision_pretrain_*`), the input
embeddings' own learning rate, the mask losses weighted more for the first steps (`--mask_loss_boost`) and a
learning curve by training minutes (`--eval_at_minutes`).
"""

import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train_hf  # noqa: E402
from examples.tiny_synthetic.from_scratch import (  # noqa: E402
    TimedEvaluationCallback,
    TinyTrainer,
    apply_config_overrides,
    check_init_std,
    check_mask_loss_boost,
    draw_input_embeddings,
    draw_language_model,
)
from gsva_hf.cli import usage_errors  # noqa: E402
from gsva_hf.data.synthetic import check_negative_kinds  # noqa: E402
from gsva_hf.training import folder_has_weights  # noqa: E402
from train_hf import flag  # noqa: E402

logger = logging.getLogger("train_tiny")


@dataclass
class TinyArguments:
    config_overrides: str = flag(
        "", "change the preset's config before the draw, e.g. 'vision_feature_layer=-1,text_config.num_hidden_layers=4'"
    )
    embedding_init_std: float | None = flag(None, "draw the LM's input embeddings with this std")
    lm_init_std: float | None = flag(None, "redraw the LM's linear layers and embeddings (or --lm_init_modules) with this std")
    lm_init_modules: str = flag("", "with --lm_init_std: only layers whose names end so, e.g. q_proj,k_proj")
    make_synthetic_data: bool = flag(False, "write the synthetic task into dataset_dir when it is missing")
    synthetic_train_images: int = flag(4000, "train images of the written task")
    synthetic_val_images: int = flag(250, "val images of the written task")
    synthetic_negative_kinds: str = flag("", "train split: weight of each hard-negative kind, e.g. 'color=2,shape=1,both=1'")
    vision_pretrain_steps: int = flag(0, "first train CLIP and the projector this many steps on what each image holds")
    vision_pretrain_target: str = flag("image", "image: pairs per image; patches: pair under each patch; both")
    vision_pretrain_learning_rate: float = flag(1e-3, "learning rate of the vision stage")
    vision_pretrain_batch_size: int = flag(32, "batch size of the vision stage")
    embedding_learning_rate: float | None = flag(None, "learning rate of the LM's input embeddings (None: learning_rate)")
    mask_loss_boost: float = flag(1.0, "weight the mask losses (BCE and Dice) this many times for --mask_loss_boost_steps")
    mask_loss_boost_steps: int = flag(0, "optimizer steps the --mask_loss_boost lasts; later steps use the model's weights")
    eval_at_minutes: str = flag("", "learning curve: evaluate val_dataset at these training minutes, e.g. 5,10,20")
    stop_at_last_minute: bool = flag(False, "learning curve: end training at the last of --eval_at_minutes (its checkpoint is saved)")
    clock_offset_seconds: float = flag(0.0, "training seconds the model already had before this run (a vision stage run when it was built), counted by the learning curve")


def parse_negative_kinds(text: str, flag: str) -> dict | None:
    """`color=2,shape=1,both=1` -> {"color": 2.0, ...} for `negative_kinds`; '' -> None (all candidates alike)."""
    if not text.strip():
        return None
    weights = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not sep or weight is None or key not in ("both", "color", "shape") or key in weights:
            raise ValueError(f"{flag}: expected distinct kind=weight pairs of 'both', 'color', 'shape', got {item!r} in {text!r}")
        weights[key] = weight
    check_negative_kinds(weights, flag)
    return weights



def ensure_synthetic_data(tiny: TinyArguments, dataset_dir: str) -> None:
    """Write the synthetic task when asked and missing; when present, it must have been written with the asked
    settings (a silently reused older task would make the run's numbers about other data)."""
    from gsva_hf.data.synthetic import MANIFEST_NAME, write_synthetic_grefcoco

    negative_kinds = parse_negative_kinds(tiny.synthetic_negative_kinds, "--synthetic_negative_kinds")
    if not tiny.make_synthetic_data:
        if negative_kinds is not None:
            raise ValueError("--synthetic_negative_kinds applies only with --make_synthetic_data")
        return
    root = Path(dataset_dir)
    wanted = {
        "train images": tiny.synthetic_train_images,
        "val images": tiny.synthetic_val_images,
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
        num_images={"train": tiny.synthetic_train_images, "val": tiny.synthetic_val_images, "testA": 0, "testB": 0},
        split_options={"train": {"negative_kinds": negative_kinds}} if negative_kinds is not None else None,
    )


def check_tiny_options(model_args, training_args, tiny: TinyArguments) -> None:
    """The from-scratch options are for presets without weights; the vision stage's result must also reach
    checkpoints (LoRA saves only what trains)."""
    from examples.tiny_synthetic.vision_pretraining import TARGETS

    steps = tiny.vision_pretrain_steps
    if steps < 0:
        raise ValueError(f"--vision_pretrain_steps must be >= 0, got {steps}")
    if tiny.vision_pretrain_target not in TARGETS:
        raise ValueError(f"--vision_pretrain_target must be one of {sorted(TARGETS)}, got {tiny.vision_pretrain_target!r}")
    path = Path(model_args.model_name_or_path)
    if folder_has_weights(path):
        if steps:
            raise ValueError(
                f"--vision_pretrain_steps is for presets without weights, but {path} holds weights (to fine-tune it "
                "with config.json add --vision_pretrain_steps 0 --config_overrides '')"
            )
        if tiny.config_overrides:
            raise ValueError(f"--config_overrides applies to presets without weights, but {path} holds weights")
        for name in ("embedding_init_std", "lm_init_std"):
            if getattr(tiny, name) is not None:
                raise ValueError(f"--{name} applies to presets without weights, but {path} holds weights")
    if tiny.stop_at_last_minute and not tiny.eval_at_minutes.strip():
        raise ValueError("--stop_at_last_minute ends training at the last of --eval_at_minutes: give --eval_at_minutes too")
    check_mask_loss_boost(tiny.mask_loss_boost, tiny.mask_loss_boost_steps)
    if tiny.lm_init_modules and tiny.lm_init_std is None:
        raise ValueError("--lm_init_modules only applies with --lm_init_std")
    if tiny.lm_init_std is not None:
        check_init_std(tiny.lm_init_std, "--lm_init_std")
    if tiny.embedding_init_std is not None:
        check_init_std(tiny.embedding_init_std)
    if tiny.vision_pretrain_target != "image" and not steps:
        raise ValueError("--vision_pretrain_target only applies with --vision_pretrain_steps > 0")
    if steps and model_args.lora_r > 0 and not (model_args.train_vision_tower and model_args.train_projector):
        raise ValueError(
            "--vision_pretrain_steps with LoRA needs --train_vision_tower true --train_projector true, "
            "or checkpoints would not hold the pretrained tower and a resumed or exported model would lose it"
        )


def initialise(model, tiny: TinyArguments) -> None:
    if tiny.lm_init_std is not None:
        draw_language_model(model, tiny.lm_init_std, tiny.lm_init_modules)
    if tiny.embedding_init_std is not None:
        draw_input_embeddings(model, tiny.embedding_init_std)


def pretrain_vision_tower(model, processor, data_args, training_args, tiny: TinyArguments) -> float:
    """Run the vision stage; write its report to OUTPUT_DIR/vision_pretraining.json; return its seconds."""
    from examples.tiny_synthetic.vision_pretraining import pretrain_vision

    report = pretrain_vision(
        model, processor.image_processor, data_args.dataset_dir, tiny.vision_pretrain_steps,
        batch_size=tiny.vision_pretrain_batch_size, learning_rate=tiny.vision_pretrain_learning_rate,
        seed=training_args.seed, target=tiny.vision_pretrain_target, log_every=int(training_args.logging_steps),
    )  # fmt: skip
    logger.info("vision pretraining: %s", report)
    if training_args.process_index == 0:
        output_dir = Path(training_args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        from gsva_hf.metrics import strict_json

        report_file = output_dir / "vision_pretraining.json"
        report_file.write_text(strict_json(report, str(report_file)) + "\n")
    return report["seconds"]


def add_learning_curve(run: train_hf.TrainingRun, tiny: TinyArguments, start_seconds: float) -> None:
    from gsva_hf.data.mixed import build_val_dataset
    from gsva_hf.evaluation import evaluate_dataset

    data_args = run.data_args
    val = build_val_dataset(data_args.dataset_dir, data_args.val_dataset)
    minutes = [float(m) for m in tiny.eval_at_minutes.split(",") if m.strip()]

    def curve_metrics(network):
        result = evaluate_dataset(
            network, run.processor, val, mode=data_args.eval_mode, batch_size=data_args.eval_batch_size, progress=False
        )
        logger.info("curve: %s", result.log_line)
        return result.metrics

    curve_path = Path(run.training_args.output_dir) / "curve.jsonl"
    curve = TimedEvaluationCallback(minutes, curve_metrics, curve_path, start_seconds=start_seconds, stop_after_last=tiny.stop_at_last_minute)
    if tiny.stop_at_last_minute and not curve.marks:
        raise ValueError(
            f"--stop_at_last_minute: every mark of --eval_at_minutes ({tiny.eval_at_minutes}) is already passed by the "
            f"{start_seconds:.0f} s the clock starts at, so none would end the run; give a later mark"
        )
    run.trainer.add_callback(curve)


def build_tiny_run(argv=None) -> train_hf.TrainingRun:
    model_args, data_args, training_args, tiny = train_hf.parse_arguments(argv, extra=(TinyArguments,))
    with usage_errors("train_tiny.py", training_args.debug_errors):
        train_hf.setup(training_args)
    with training_args.main_process_first(desc="synthetic data"):
        ensure_synthetic_data(tiny, data_args.dataset_dir)
    check_tiny_options(model_args, training_args, tiny)
    if tiny.stop_at_last_minute and not data_args.val_dataset:
        raise ValueError("--stop_at_last_minute: the learning curve needs --val_dataset to evaluate at its marks, and it is empty")
    train_hf.check_own_learning_rates(
        training_args,
        {"mask_head_learning_rate": training_args.mask_head_learning_rate, "embedding_learning_rate": tiny.embedding_learning_rate},
    )
    model, processor = train_hf.load_model(
        model_args, training_args,
        configure=lambda config: apply_config_overrides(config, tiny.config_overrides),
        initialise=lambda network: initialise(network, tiny),
    )  # fmt: skip
    pretrain_seconds = 0.0
    if tiny.vision_pretrain_steps > 0 and not (training_args.resume_from_checkpoint or training_args.export_only):
        pretrain_seconds = pretrain_vision_tower(model, processor, data_args, training_args, tiny)
    run = train_hf.assemble_run(
        model, processor, model_args, data_args, training_args, trainer_class=TinyTrainer,
        embedding_learning_rate=tiny.embedding_learning_rate, mask_loss_boost=tiny.mask_loss_boost,
        mask_loss_boost_steps=tiny.mask_loss_boost_steps,
    )  # fmt: skip
    run.recorded["tiny"] = asdict(tiny)
    if tiny.eval_at_minutes and data_args.val_dataset:
        add_learning_curve(run, tiny, pretrain_seconds + tiny.clock_offset_seconds)
    return run


def main(argv=None) -> dict:
    return train_hf.train_and_finish(build_tiny_run(argv))


if __name__ == "__main__":
    main()
