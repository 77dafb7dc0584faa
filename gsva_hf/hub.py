"""`gsva-push MODEL_DIR REPO_ID`: lay out a Hub repository for a GSVA folder (and upload it unless `--dry-run`).

The folder is re-saved by the project's own classes, so the repository always holds what `trust_remote_code`
needs: safetensors shards of an explicit size (plus their index), `config.json` with `auto_map` for
AutoConfig/AutoModel/AutoModelForCausalLM/AutoProcessor, the processor and tokenizer files (`tokenizer.json`
included), the code files (`REMOTE_CODE_FILES`), and a model card whose metadata `huggingface_hub` writes. A
model of the synthetic shapes task is detected from its files and labelled as such, never as gRefCOCO.
`python -m gsva_hf.hub refresh-bundled` rewrites the bundled model's non-weight files the same way.

`pipeline_tag` is `image-text-to-text`: the model reads an image and a question and answers in text (the answer
decides which targets exist). No transformers pipeline returns GSVA's masks, so `image-segmentation` or
`mask-generation` would promise a Hub widget and a `pipeline()` that cannot load it; masks come from
`model.segment(...)`. Comparable LLM+SAM releases (Sa2VA) use the same tag.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .cli import CommandParser, describe, fail, refuse_link, usage_errors
from .export import CODE_FILES, code_files_differing, save_folder, size_words
from .loading import BUNDLED_MODEL, DTYPES

# Written into every folder gsva-push lays out; only such a folder is ever replaced by --overwrite.
PUSH_MARKER = ".gsva-push"
MARKER_TEXT = "Written by gsva-push for "  # how the marker starts; a file that does not is not ours
BUNDLED_MODEL_ID = "gsva_hf/assets/gsva-tiny-synthetic"  # the card's model_id: the folder, from a clone's root
AUTO_CLASSES = ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoProcessor")
PIPELINE_TAG = "image-text-to-text"
TAGS = ("custom_code", "gsva", "referring-segmentation", "generalized-referring-segmentation", "llava", "sam")
DEFAULT_SHARD_SIZE = "5GB"
SYNTHETIC_TARGETS = ("the red circle", "the blue square", "the green star")
REAL_TARGETS = ("the man on the left", "the dog")
SYNTHETIC_TAG = "synthetic-data"
SYNTHETIC_DATASET_TYPE = "gsva-synthetic-shapes"
SYNTHETIC_DATASET_NAME = "GSVA synthetic shapes"
SYNTHETIC_DESCRIPTION = (
    "the synthetic coloured-shapes task of `gsva_hf.data.synthetic` (written in the gRefCOCO file layout, but "
    "not gRefCOCO: coloured circles, squares, triangles and stars on grey, described by colour, shape and relative "
    "position)"
)
EXAMPLE_NAME = "example.png"
BUNDLED_EXAMPLE = Path(__file__).resolve().parent / "assets" / EXAMPLE_NAME
METRICS = (("giou", "gIoU"), ("ciou", "cIoU"), ("n_acc", "N-acc"), ("t_acc", "T-acc"))
DATASET_NAMES = {
    "grefcoco": "gRefCOCO",
    "refcoco": "RefCOCO",
    "refcoco+": "RefCOCO+",
    "refcocog": "RefCOCOg",
    "refclef": "RefCLEF",
    "refzom": "RefZOM",
    "reasonseg": "ReasonSeg",
}
STALE_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"]
CITATION = """@inproceedings{xia2024gsva,
  title     = {GSVA: Generalized Segmentation via Multimodal Large Language Models},
  author    = {Xia, Zhuofan and Han, Dongchen and Han, Yizeng and Pan, Xuran and Song, Shiji and Huang, Gao},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {3858--3869},
  year      = {2024}
}"""


# ---------------------------------------------------------------------------------------------- input checks
def check_model_dir(model_dir: Path) -> dict:
    """The folder's config, after making sure it is a complete GSVA folder (not LLaVA, not a LoRA adapter)."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"MODEL_DIR {model_dir}: no such folder")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        if (model_dir / "adapter_config.json").is_file():
            raise ValueError(
                f"MODEL_DIR {model_dir}: holds a LoRA adapter, not a model; export a merged folder first "
                "(train_hf.py --export_only --resume_from_checkpoint CKPT writes OUTPUT_DIR/final)"
            )
        raise FileNotFoundError(f"MODEL_DIR {model_dir}: no config.json; expected a folder saved by GSVAForCausalLM")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"MODEL_DIR {model_dir}: config.json is unreadable ({error})") from error
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "gsva":
        raise ValueError(
            f"MODEL_DIR {model_dir}: config.json has model_type {model_type!r}, expected 'gsva' (a folder written by "
            "train_hf.py, gsva_hf.convert_gsva_to_hf or GSVAForCausalLM.save_pretrained)"
        )
    if not (model_dir / "processor_config.json").is_file():
        raise FileNotFoundError(
            f"MODEL_DIR {model_dir}: no processor_config.json; save the GSVAProcessor into the folder too"
        )
    return config


def read_eval_json(path: Path) -> dict:
    """One `eval_hf.py` result file, checked for the fields the card uses."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"--eval-json {path}: cannot read it ({error.strerror or error})") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--eval-json {path}: not valid JSON ({error})") from error
    expected = "eval_hf.py's output: metrics {giou, ciou, ...}, val_dataset, mode, protocol"
    if not isinstance(payload, dict):
        raise ValueError(f"--eval-json {path}: holds a {type(payload).__name__}, expected {expected}")
    missing = [key for key in ("metrics", "val_dataset", "mode", "protocol") if key not in payload]
    if missing:
        raise ValueError(f"--eval-json {path}: missing {', '.join(missing)}; expected {expected}")
    wrong = [key for key in ("val_dataset", "mode", "protocol") if not isinstance(payload[key], str)]
    if wrong:
        raise ValueError(f"--eval-json {path}: {', '.join(wrong)} should be text; expected {expected}")
    metrics = payload["metrics"]
    if not isinstance(metrics, dict) or not {"giou", "ciou"} <= set(metrics):
        raise ValueError(f"--eval-json {path}: 'metrics' lacks giou/ciou; expected {expected}")
    for key, _ in METRICS:
        value = metrics.get(key)
        if value is not None and not isinstance(value, (int, float)):
            raise ValueError(f"--eval-json {path}: metrics.{key} is {value!r}, expected a number or null")
    return payload


# ---------------------------------------------------------------------------------------------- model card
def percent(value) -> float | None:
    return None if value is None else round(100.0 * float(value), 2)


def dataset_parts(spec: str) -> tuple[str, str | None, str | None]:
    """`grefcoco|unc|val` -> (grefcoco, unc, val); `ReasonSeg|val` -> (ReasonSeg, None, val)."""
    parts = [p for p in spec.split("|") if p]
    if len(parts) >= 3:
        return parts[0], parts[1], parts[-1]
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return spec, None, None


def eval_table(evals: list[tuple[str, dict]]) -> str:
    """Markdown table, one row per eval file: percentages as in the paper, "–" where a metric is undefined."""
    lines = [
        "| Data | Split | Mode | Protocol | gIoU | cIoU | N-acc | T-acc | Targets | dtype |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, payload in evals:
        metrics = payload["metrics"]
        _, _, split = dataset_parts(payload["val_dataset"])
        cells = [f"{percent(metrics.get(key)):.2f}" if metrics.get(key) is not None else "–" for key, _ in METRICS]
        count = metrics.get("count", "–")
        lines.append(
            f"| {name} | {split or '–'} | {payload['mode']} | {payload['protocol']} | {' | '.join(cells)} | {count} "
            f"| {payload.get('dtype', '–')} |"
        )
    return "\n".join(lines)


def eval_results(evals: list[tuple[str, dict]], synthetic: bool = False) -> list[EvalResult]:
    """model-index entries; the mode and protocol go into the metric name and config so rows stay distinct.

    Results on the synthetic task carry its own dataset type, so the Hub never lists them as gRefCOCO results.
    """
    results = []
    for name, payload in evals:
        dataset, config, split = dataset_parts(payload["val_dataset"])
        if synthetic:
            dataset, config = SYNTHETIC_DATASET_TYPE, None
        for key, label in METRICS:
            value = percent(payload["metrics"].get(key))
            if value is None:
                continue
            results.append(
                EvalResult(
                    task_type="image-segmentation",
                    task_name="Generalized referring expression segmentation",
                    dataset_type=dataset,
                    dataset_name=name,
                    dataset_config=config,
                    dataset_split=split,
                    metric_type=key,
                    metric_name=f"{label} ({payload['mode']})",
                    metric_config=f"{payload['protocol']}/{payload['mode']}",
                    metric_value=value,
                )
            )
    return results


def usage_snippet(repo_id: str, targets: list[str], with_example: bool, synthetic: bool = True) -> str:
    """Python that runs as written against the repository (or a local copy: set `model_id` to its path).

    Without a shipped example the synthetic model draws shapes of its task; a real model opens the user's photo.
    """
    imports = []
    if with_example:
        imports = ["from transformers.utils import cached_file"]
        image_lines = ['image = Image.open(cached_file(model_id, "example.png", revision=revision)).convert("RGB")']
    elif synthetic:
        image_lines = [
            'image = Image.new("RGB", (320, 240), (128, 128, 128))  # or Image.open("your.jpg").convert("RGB")',
            "draw = ImageDraw.Draw(image)",
            "draw.ellipse([40, 60, 140, 160], fill=(220, 40, 40))",
            "draw.rectangle([190, 70, 280, 160], fill=(40, 80, 230))",
        ]
    else:
        image_lines = ['image = Image.open("your_photo.jpg").convert("RGB")']
    return "\n".join(
        [
            "import torch",
            "from PIL import Image" + (", ImageDraw" if synthetic and not with_example else ""),
            "from transformers import AutoModelForCausalLM, AutoProcessor",
            *imports,
            "",
            f"model_id = {json.dumps(repo_id)}",
            'revision = "main"  # pin a commit hash here: trust_remote_code runs this repository\'s Python code',
            'device = "cuda" if torch.cuda.is_available() else "cpu"',
            "",
            "model = AutoModelForCausalLM.from_pretrained(",
            '    model_id, revision=revision, trust_remote_code=True, dtype="auto"',
            ").to(device).eval()",
            "processor = AutoProcessor.from_pretrained(model_id, revision=revision, trust_remote_code=True)",
            "",
            *image_lines,
            "",
            f"result = model.segment(processor, image, targets={json.dumps(list(targets))})[0]",
            "print(result.answer)",
            "for target in result.targets:",
            '    print(f"{target.phrase!r}: rejected={target.rejected}, mask pixels={int(target.mask.sum())}, "',
            '          f"score={target.score:.2f}")',
        ]
    )


def model_details(config: dict, parameters: int, dtype: str, training_data: str = "not stated") -> str:
    if config.get("vlm_config"):
        return composed_details(config, parameters, dtype, training_data)
    text, vision = config.get("text_config", {}), config.get("vision_config", {})
    sam_vision = config.get("sam_config", {}).get("vision_config", {})
    rows = [
        ("Parameters", f"{parameters:,} ({size_words(parameters)})"),
        ("Training data", training_data),
        ("Weights dtype", dtype),
        (
            "Language model",
            f"{text.get('model_type', '?')}, {text.get('num_hidden_layers', '?')} layers, "
            f"hidden {text.get('hidden_size', '?')}, vocabulary {text.get('vocab_size', '?')}",
        ),
        (
            "Vision tower",
            f"CLIP ViT, {vision.get('num_hidden_layers', '?')} layers, {vision.get('image_size', '?')} px, "
            f"patch {vision.get('patch_size', '?')}",
        ),
        ("Projector", str(config.get("projector_type", "?"))),
        (
            "Mask decoder",
            f"SAM, image encoder {sam_vision.get('num_hidden_layers', '?')} layers / hidden "
            f"{sam_vision.get('hidden_size', '?')}, {sam_vision.get('image_size', '?')} px",
        ),
        ("`[SEG]` / `[REJ]` ids", f"{config.get('seg_token_id', '?')} / {config.get('rej_token_id', '?')}"),
    ]
    return "\n".join(["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]])


def composed_details(config: dict, parameters: int, dtype: str, training_data: str) -> str:
    """The card's table for GSVA composed on a transformers VLM (`gsva-compose`): the two parts' own types."""
    vlm, sam = config["vlm_config"], config.get("sam_config", {})
    text = vlm.get("text_config", {})
    rows = [
        ("Parameters", f"{parameters:,} ({size_words(parameters)})"),
        ("Training data", training_data),
        ("Weights dtype", dtype),
        ("Vision-language model", f"{vlm.get('model_type', '?')} (transformers), language model {text.get('num_hidden_layers', '?')} layers, hidden {text.get('hidden_size', '?')}, vocabulary {text.get('vocab_size', '?')}"),
        ("Mask decoder", f"{sam.get('model_type', '?')} (transformers), prompt width {config.get('out_dim', '?')}"),
        ("`[SEG]` / `[REJ]` ids", f"{config.get('seg_token_id', '?')} / {config.get('rej_token_id', '?')}"),
    ]
    return "\n".join(["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]])


def build_card(
    repo_id: str,
    config: dict,
    parameters: int,
    dtype: str,
    evals: list[tuple[str, dict]],
    base_models: list[str],
    base_model_relation: str | None,
    license: str,
    license_name: str | None,
    license_link: str | None,
    datasets: list[str],
    extra_tags: list[str],
    targets: list[str],
    with_example: bool,
    model_index: bool,
    synthetic: bool = False,
    training_data: str | None = None,
) -> ModelCard:
    """Model card: metadata through `ModelCardData` (the Hub's schema), body in plain Markdown.

    The card opens with what the model is (size, training data); a model of the synthetic task is tagged and
    its results carry the synthetic dataset type, so nobody reads them as gRefCOCO results.
    """
    model_name = repo_id.split("/")[-1]
    results = eval_results(evals, synthetic) if model_index else []
    if training_data is None:
        if synthetic:
            training_data = f"trained from scratch on {SYNTHETIC_DESCRIPTION}"
        elif datasets:
            training_data = ", ".join(f"`{name}`" for name in datasets)
        else:
            training_data = "not stated (gsva-push --training-data TEXT)"
    if synthetic:
        about = (
            f"**A toy model, not a gRefCOCO model.** {size_words(parameters)} parameters, {training_data}. It "
            "knows that task's words and nothing else; any numbers below are on that task and are not comparable "
            "with results on gRefCOCO or any real benchmark. It exists to test and demonstrate the code."
        )
    else:
        about = f"{size_words(parameters)} parameters. Training data: {training_data}."
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=list(dict.fromkeys([*TAGS, *([SYNTHETIC_TAG] if synthetic else []), *extra_tags])),
        license=license,
        license_name=license_name,
        license_link=license_link,
        base_model=list(base_models) or None,
        datasets=list(datasets) or None,
        language=["en"],
        model_name=model_name,
        eval_results=results or None,
        base_model_relation=base_model_relation if base_models else None,
    )
    sections = [
        f"# {model_name}",
        about,
        "GSVA ([CVPR 2024](https://openaccess.thecvf.com/content/CVPR2024/html/Xia_GSVA_Generalized_Segmentation_via_"
        "Multimodal_Large_Language_Models_CVPR_2024_paper.html), [original code](https://github.com/LeapLabTHU/GSVA)) "
        "segments what a sentence describes. LLaVA reads the image and the question and answers with one `[SEG]` "
        "token per target that is present and one `[REJ]` token per target that is not; each `[SEG]` state becomes a "
        "prompt of Segment Anything's mask decoder. One answer can therefore segment several objects and say "
        "explicitly that a described object is absent.",
        "This repository is a transformers-native port: it loads with `AutoModelForCausalLM` / `AutoProcessor` and "
        "`trust_remote_code=True`, and `model.segment(...)` generates the answer and returns one mask per target.",
        "## Model details",
        model_details(config, parameters, dtype, training_data),
        "## Usage",
        "```python\n" + usage_snippet(repo_id, targets, with_example, synthetic) + "\n```",
        "`model.segment(processor, images, text=... | targets=[...])` returns, per image, the generated `answer` and "
        "`targets`, each with `phrase`, `rejected`, `mask` (bool, original image size; all False when rejected), "
        "`score` (probability of the model's own `[SEG]`/`[REJ]` choice) and `mask_score`. `text` is a question used "
        "as typed; `targets` are phrases put into GSVA's multi-target question. Extra keyword arguments go to "
        "`generate()`; `batch_size` controls batched generation.",
        "### Pin a revision",
        "`trust_remote_code=True` downloads and runs the Python files of this repository ("
        + ", ".join(f"`{name}`" for name in CODE_FILES)
        + '). Read them, then pass `revision="<commit hash>"` to both '
        "`from_pretrained` calls so that a later push cannot change the code you run.",
    ]
    if evals:
        sections += [
            "## Results",
            eval_table(evals),
            "Percentages, computed by `eval_hf.py` of the port. `teacher_forced` is the paper's protocol (the "
            "ground-truth answer is fed and each `[SEG]`/`[REJ]` decision is read one position earlier); `generate` "
            "lets the model write its own answer, which is what `segment()` does. Protocol `gsva` uses GSVA's metric "
            "definitions, `rela` ReLA's. N-acc is the accuracy on targets that are absent, T-acc on present ones; "
            '"–" marks a metric the data leave undefined.'
            + (f" These results are on {SYNTHETIC_DESCRIPTION}, not on gRefCOCO." if synthetic else ""),
        ]
    sections += [
        "## Files",
        "`model*.safetensors` (+ `model.safetensors.index.json` when sharded), `config.json` (with `auto_map`), "
        "`generation_config.json`, `processor_config.json`, `tokenizer.json`, `tokenizer_config.json`, and the code "
        "files " + ", ".join(f"`{name}`" for name in CODE_FILES) + " (they import only torch, "
        "transformers and each other)."
        + (" `example.png` is the image the usage snippet segments." if with_example else ""),
        "## Citation",
        "```bibtex\n" + CITATION + "\n```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


# ---------------------------------------------------------------------------------------------- layout + upload
def check_layout(out_dir: Path) -> list[str]:
    """Fail loudly if a file a `trust_remote_code` user needs is missing; returns the sorted file names."""
    names = sorted(p.name for p in out_dir.iterdir() if p.is_file())
    needed = ["config.json", "processor_config.json", "tokenizer.json", "README.md", *CODE_FILES]
    missing = [name for name in needed if name not in names]
    if not any(name.endswith(".safetensors") for name in names):
        missing.append("*.safetensors")
    if missing:
        raise RuntimeError(f"{out_dir}: the saved repository lacks {', '.join(missing)}")
    auto_map = json.loads((out_dir / "config.json").read_text(encoding="utf-8")).get("auto_map", {})
    lacking = [name for name in AUTO_CLASSES if name not in auto_map]
    if lacking:
        raise RuntimeError(f"{out_dir}/config.json: auto_map lacks {', '.join(lacking)}")
    return names


def check_out_dir(out_dir: Path, overwrite: bool) -> bool:
    """Whether `out_dir` holds an earlier layout to remove; anything else that is not empty is refused.

    Only a folder holding gsva-push's marker file is replaced: a model folder (it has a config and a README
    too) may hold the user's own files. The marker must be a regular file (not a link) holding the text gsva-push
    writes, and `out_dir` itself must not be a link, empty or not: nothing is written or deleted through one.
    """
    refuse_link(out_dir, "--out")
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir}: exists and is not a folder")
    if not any(out_dir.iterdir()):
        return False
    if not overwrite:
        raise FileExistsError(f"--out {out_dir}: not empty; pass --overwrite to replace an earlier gsva-push layout")
    marker = out_dir / PUSH_MARKER
    if marker.is_symlink() or not marker.is_file():
        found = f"no {PUSH_MARKER} file in it" if not marker.is_symlink() else f"its {PUSH_MARKER} is a symbolic link"
        raise FileExistsError(
            f"--out {out_dir}: not empty and not written by gsva-push ({found}); refusing to delete it: choose an "
            "empty or new --out folder"
        )
    try:
        ours = marker.read_text(encoding="utf-8").startswith(MARKER_TEXT)
    except (OSError, UnicodeDecodeError):
        ours = False
    if not ours:
        raise FileExistsError(
            f"--out {out_dir}: not empty and not written by gsva-push ({marker} does not hold the text gsva-push "
            "writes there); refusing to delete it: choose an empty or new --out folder"
        )
    return True


# ---------------------------------------------------------------------------------------------- synthetic data
def _card_tags(folder: Path) -> list[str]:
    try:
        return list(ModelCard.load(folder / "README.md").data.tags or [])
    except Exception:  # no card, or one huggingface_hub cannot parse: no evidence either way
        return []


def _synthetic_tree(path: Path) -> Path | None:
    """The folder above `path` that holds the synthetic task's manifest, if any."""
    from gsva_hf.data.synthetic import MANIFEST_NAME

    for folder in [path, *path.parents]:
        if (folder / MANIFEST_NAME).is_file():
            return folder
    return None


def _synthetic_model(folder: Path) -> str | None:
    """Why the model in `folder` is a model of the synthetic task, or None."""
    if not folder.is_dir():
        return None
    if folder.resolve() == BUNDLED_MODEL:
        return f"{folder} is the bundled synthetic model"
    if SYNTHETIC_TAG in _card_tags(folder):
        return f"the model card in {folder} is tagged {SYNTHETIC_TAG}"
    for args_file in (folder / "train_args.json", folder.parent / "train_args.json"):
        try:
            dataset_dir = json.loads(args_file.read_text(encoding="utf-8"))["data"]["dataset_dir"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        tree = _synthetic_tree(Path(dataset_dir).expanduser().resolve())
        if tree is not None:
            return f"{args_file} trained it on the synthetic task in {tree}"
    return None


def synthetic_evidence(model_dir: Path, evals: list[tuple[Path, dict]]) -> list[str]:
    """Reasons to treat the model and its results as the synthetic task's, read from the files themselves:
    the model folder (the bundled model, a card tagged synthetic, train_args.json naming a synthetic data tree)
    and each eval JSON (the images it scored lie in a tree with the synthetic manifest, or its `model` is one)."""
    reasons = [r for r in [_synthetic_model(model_dir)] if r]
    for path, payload in evals:
        images = [r.get("image") for r in payload.get("images") or [] if isinstance(r, dict) and isinstance(r.get("image"), str)]
        for image in dict.fromkeys(str(Path(i).parent) for i in images[:200]):
            tree = _synthetic_tree(Path(image).expanduser().resolve())
            if tree is not None:
                reasons.append(f"--eval-json {path} scored images of the synthetic task in {tree}")
                break
        model = payload.get("model")
        reason = _synthetic_model(Path(model)) if isinstance(model, str) and model else None
        if reason:
            reasons.append(f"--eval-json {path}: {reason}")
    return reasons


def layout_repo(
    model_dir: str | Path,
    out_dir: str | Path,
    repo_id: str,
    *,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    dtype: str = "auto",
    eval_jsons: list[str | Path] = (),
    eval_names: list[str] = (),
    model_index: bool = True,
    base_models: list[str] = (),
    base_model_relation: str | None = None,
    license: str = "apache-2.0",
    license_name: str | None = None,
    license_link: str | None = None,
    datasets: list[str] = (),
    tags: list[str] = (),
    targets: list[str] | None = None,
    example_image: str | Path | None = None,
    overwrite: bool = False,
    synthetic: bool | None = None,
    training_data: str | None = None,
    marker: bool = True,
) -> list[str]:
    """Write the repository folder; returns its file names. Inputs are all checked before anything is written;
    weights that hold NaN or infinity (in the saved `dtype`) are refused, named.

    `synthetic` None detects a model of the synthetic task from the files (`synthetic_evidence`); then the card
    says so, its results get the synthetic dataset type, and the snippet defaults to the bundled example and
    shapes; a real model's card defaults to the user's photo and everyday phrases.
    """
    from transformers.utils.hub import convert_file_size_to_int

    from modeling_gsva import GSVAForCausalLM
    from processing_gsva import GSVAProcessor

    from .loading import check_gsva_folder, from_pretrained_strictly

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_model_dir(model_dir)
    if eval_names and len(eval_names) != len(eval_jsons):
        raise ValueError(f"--eval-name given {len(eval_names)} times but --eval-json {len(eval_jsons)} times")
    payloads = [(Path(path), read_eval_json(Path(path))) for path in eval_jsons]
    if synthetic is None:
        reasons = synthetic_evidence(model_dir, payloads)
        if reasons:
            print(f"gsva-push: a model of the synthetic task ({reasons[0]}); the card says so", file=sys.stderr)
        synthetic = bool(reasons)
    evals = []
    for index, (_, payload) in enumerate(payloads):
        dataset = dataset_parts(payload["val_dataset"])[0]
        default_name = SYNTHETIC_DATASET_NAME if synthetic else DATASET_NAMES.get(dataset.lower(), dataset)
        evals.append((eval_names[index] if eval_names else default_name, payload))
    if license == "other" and not (license_name and license_link):
        raise ValueError("--license other needs --license-name and --license-link")
    if targets is None:
        targets = list(SYNTHETIC_TARGETS if synthetic else REAL_TARGETS)
    if not targets:
        raise ValueError("--example-targets holds no phrase")
    if example_image is None and synthetic and BUNDLED_EXAMPLE.is_file():
        example_image = BUNDLED_EXAMPLE
    clear = check_out_dir(out_dir, overwrite)
    example = None
    if example_image is not None:
        from processing_gsva import load_image

        if not Path(example_image).is_file():
            raise FileNotFoundError(f"--example-image {example_image}: no such file")
        try:  # decoded now, so an unreadable image is refused before anything is written
            example = load_image(example_image)
        except ValueError as error:
            raise ValueError(f"--example-image {example_image}: {error}") from error
    try:
        shard_bytes = convert_file_size_to_int(max_shard_size)
    except ValueError:
        shard_bytes = 0
    if shard_bytes <= 0:
        raise ValueError(f"--max-shard-size {max_shard_size!r}: expected a positive size such as 5GB or 500MB")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")

    # As strict as load_gsva: a tensor the folder lacks would be pushed as a random draw.
    check_gsva_folder(model_dir)
    model = from_pretrained_strictly(
        GSVAForCausalLM, model_dir, f"MODEL_DIR {model_dir}", dtype=DTYPES[dtype],
        finite_source=f"MODEL_DIR {model_dir}" + (f" as {dtype}" if dtype != "auto" else ""),
    )  # fmt: skip
    processor = GSVAProcessor.from_pretrained(model_dir)
    processor.check_config(model.config)
    if clear:
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if marker:
        (out_dir / PUSH_MARKER).write_text(
            f"{MARKER_TEXT}{repo_id} from {model_dir}; gsva-push --overwrite may replace this folder.\n"
        )
    save_folder(model, processor, out_dir, max_shard_size)
    if example is not None:
        example.save(out_dir / EXAMPLE_NAME)
    saved_config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    card = build_card(
        repo_id,
        saved_config,
        sum(p.numel() for p in model.parameters()),
        str(model.dtype).removeprefix("torch."),
        evals,
        list(base_models),
        base_model_relation or ("merge" if len(base_models) > 1 else None),
        license,
        license_name,
        license_link,
        list(datasets),
        list(tags),
        list(targets),
        example_image is not None,
        model_index,
        synthetic,
        training_data,
    )
    card.save(out_dir / "README.md")
    return check_layout(out_dir)


# ---------------------------------------------------------------------------------------------- bundled model
BUNDLED_WEIGHTS = ("model.safetensors",)


def refresh_bundled(folder: str | Path = BUNDLED_MODEL) -> list[str]:
    """Rewrite the bundled model's code, config, processor files and card from this checkout, as gsva-push lays
    them out. The weights file is left untouched when the re-saved tensors equal it; when it is in an earlier
    layout (keys that `from_pretrained`'s legacy mapping renames, `current_key`), the tensors are compared through
    that mapping and, equal, the file is rewritten once in the current layout. Returns the names written."""
    from safetensors.torch import load_file

    from modeling_gsva import current_key

    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="gsva-bundled-") as scratch:
        fresh = Path(scratch) / "layout"
        layout_repo(folder, fresh, BUNDLED_MODEL_ID, synthetic=True, marker=False)
        relaid = []
        for weights in BUNDLED_WEIGHTS:
            kept, saved = load_file(folder / weights), load_file(fresh / weights)
            renamed = {current_key(k): v for k, v in kept.items()}
            differ = sorted(
                k for k in renamed.keys() | saved.keys() if k not in renamed or k not in saved or not renamed[k].equal(saved[k])
            )
            if differ:
                raise RuntimeError(f"{folder / weights}: re-saved tensors differ from the bundled ones: {differ[:5]}")
            if kept.keys() != saved.keys():
                relaid.append(weights)
        written = []
        for path in sorted(fresh.iterdir()):
            if path.name not in BUNDLED_WEIGHTS or path.name in relaid:
                shutil.copyfile(path, folder / path.name)
                written.append(path.name)
    return written


def bundled_out_of_date(folder: str | Path = BUNDLED_MODEL) -> list[str]:
    """Code files of the bundled model that differ from this checkout's (missing ones included)."""
    return code_files_differing(folder)


def upload(
    out_dir: str | Path,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    commit_message: str = "Upload GSVA model",
    create_pr: bool = False,
):
    """Create the repo (and branch) if needed, then one commit that also deletes stale weight shards."""
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision and revision != "main" and not create_pr:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(out_dir),
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        delete_patterns=STALE_PATTERNS,
        ignore_patterns=[PUSH_MARKER],
    )


def refresh_main(argv) -> int:
    parser = CommandParser(
        prog="python -m gsva_hf.hub refresh-bundled",
        description="rewrite the bundled model's code, config, processor files and card from this checkout "
        "(the weights stay as they are)",
    )
    parser.add_argument("folder", nargs="?", type=Path, default=BUNDLED_MODEL)
    args = parser.parse_args(argv)
    try:
        names = refresh_bundled(args.folder)
    except (OSError, ValueError, RuntimeError) as error:
        if args.debug:
            raise
        fail("refresh-bundled", describe(error))
    print(f"refreshed {args.folder}: {', '.join(names)}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["refresh-bundled"]:
        return refresh_main(argv[1:])
    parser = CommandParser(prog="gsva-push", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="saved GSVA folder (config, weights, processor)")
    parser.add_argument("repo_id", help="Hub repository, e.g. user/gsva-7b")
    parser.add_argument("--out", type=Path, help="folder to lay out (required with --dry-run; else a temporary one)")
    parser.add_argument("--dry-run", action="store_true", help="only write the folder, upload nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier gsva-push layout in --out")
    parser.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE, help="safetensors shard size")
    parser.add_argument(
        "--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="weights dtype to save"
    )
    parser.add_argument("--eval-json", action="append", default=[], type=Path, help="eval_hf.py JSON (repeatable)")
    parser.add_argument("--eval-name", action="append", default=[], help="display name per --eval-json, same order")
    parser.add_argument("--no-model-index", action="store_true", help="results table only, no model-index metadata")
    parser.add_argument("--base-model", action="append", default=[], help="parent model id (repeatable)")
    parser.add_argument("--base-model-relation", choices=["finetune", "merge", "adapter", "quantized"])
    parser.add_argument(
        "--license", default="apache-2.0", help="license id ('other' + --license-name + --license-link)"
    )
    parser.add_argument("--license-name")
    parser.add_argument("--license-link")
    parser.add_argument("--dataset", action="append", default=[], help="training dataset id (repeatable)")
    parser.add_argument("--tag", action="append", default=[], help="extra tag (repeatable)")
    parser.add_argument("--training-data", help="what the model was trained on, in words (for the card)")
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="the model and its results are of the synthetic shapes task (also detected from the files)",
    )
    parser.add_argument(
        "--example-targets",
        help='phrases for the card snippet, ";"-separated; when not given: shapes for a synthetic model, else everyday ones',
    )
    parser.add_argument(
        "--example-image",
        type=Path,
        help=f"image shipped as {EXAMPLE_NAME}; when not given: the bundled one for a synthetic model, none otherwise",
    )
    parser.add_argument("--revision", help="branch to push to (created when missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", default="Upload GSVA model")
    args = parser.parse_args(argv)
    if args.dry_run and args.out is None:
        parser.error("--dry-run needs --out DIR (the folder to write)")
    if "/" not in args.repo_id.strip("/"):
        parser.error(f"REPO_ID {args.repo_id!r}: expected NAMESPACE/NAME")
    targets = None if args.example_targets is None else [p.strip() for p in args.example_targets.split(";") if p.strip()]

    with tempfile.TemporaryDirectory(prefix="gsva-push-") as scratch:
        out_dir = args.out or Path(scratch) / "repo"
        with usage_errors("gsva-push", args.debug):
            names = layout_repo(
                args.model_dir,
                out_dir,
                args.repo_id,
                max_shard_size=args.max_shard_size,
                dtype=args.dtype,
                eval_jsons=args.eval_json,
                eval_names=args.eval_name,
                model_index=not args.no_model_index,
                base_models=args.base_model,
                base_model_relation=args.base_model_relation,
                license=args.license,
                license_name=args.license_name,
                license_link=args.license_link,
                datasets=args.dataset,
                tags=args.tag,
                targets=targets,
                example_image=args.example_image,
                overwrite=args.overwrite,
                synthetic=True if args.synthetic else None,
                training_data=args.training_data,
            )
        print(f"wrote {out_dir}: {', '.join(names)}")
        if args.dry_run:
            return 0
        try:
            commit = upload(
                out_dir,
                args.repo_id,
                revision=args.revision,
                private=args.private,
                commit_message=args.commit_message,
                create_pr=args.create_pr,
            )
        except Exception as error:  # network, auth and offline errors all end the command the same way
            print(f"gsva-push: upload to {args.repo_id} failed: {type(error).__name__}: {error}", file=sys.stderr)
            return 1
        print(f"uploaded: {getattr(commit, 'commit_url', commit)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
