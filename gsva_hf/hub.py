"""`gsva-push MODEL_DIR REPO_ID`: lay out a Hub repository for a GSVA folder (and upload it unless `--dry-run`).

The folder is re-saved by the project's own classes, so the repository always holds what `trust_remote_code`
needs: safetensors shards of an explicit size (plus their index), `config.json` with `auto_map` for
AutoConfig/AutoModel/AutoModelForCausalLM/AutoProcessor, the processor and tokenizer files (`tokenizer.json`
included), the three code files, and a model card whose metadata `huggingface_hub` writes.

`pipeline_tag` is `image-text-to-text`: the model reads an image and a question and answers in text (the answer
decides which targets exist). No transformers pipeline returns GSVA's masks, so `image-segmentation` or
`mask-generation` would promise a Hub widget and a `pipeline()` that cannot load it; masks come from
`model.segment(...)`. Comparable LLM+SAM releases (Sa2VA) use the same tag.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

CODE_FILES = ("configuration_gsva.py", "modeling_gsva.py", "processing_gsva.py", "pipeline_gsva.py")
AUTO_CLASSES = ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoProcessor")
PIPELINE_TAG = "image-text-to-text"
TAGS = ("custom_code", "gsva", "referring-segmentation", "generalized-referring-segmentation", "llava", "sam")
DEFAULT_SHARD_SIZE = "5GB"
DEFAULT_TARGETS = ("the red circle", "the blue square", "the green star")
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


def eval_results(evals: list[tuple[str, dict]]) -> list[EvalResult]:
    """model-index entries; the mode and protocol go into the metric name and config so rows stay distinct."""
    results = []
    for name, payload in evals:
        dataset, config, split = dataset_parts(payload["val_dataset"])
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


def usage_snippet(repo_id: str, targets: list[str], with_example: bool) -> str:
    """Python that runs as written against the repository (or a local copy: set `model_id` to its path)."""
    if with_example:
        imports = ["from transformers.utils import cached_file"]
        image_lines = ['image = Image.open(cached_file(model_id, "example.png", revision=revision)).convert("RGB")']
    else:
        imports = []
        image_lines = [
            'image = Image.new("RGB", (320, 240), (128, 128, 128))  # or Image.open("your.jpg").convert("RGB")',
            "draw = ImageDraw.Draw(image)",
            "draw.ellipse([40, 60, 140, 160], fill=(220, 40, 40))",
            "draw.rectangle([190, 70, 280, 160], fill=(40, 80, 230))",
        ]
    return "\n".join(
        [
            "import torch",
            "from PIL import Image" + ("" if with_example else ", ImageDraw"),
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


def model_details(config: dict, parameters: int, dtype: str) -> str:
    text, vision = config.get("text_config", {}), config.get("vision_config", {})
    sam_vision = config.get("sam_config", {}).get("vision_config", {})
    rows = [
        ("Parameters", f"{parameters:,}"),
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
) -> ModelCard:
    """Model card: metadata through `ModelCardData` (the Hub's schema), body in plain Markdown."""
    model_name = repo_id.split("/")[-1]
    results = eval_results(evals) if model_index else []
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=list(dict.fromkeys([*TAGS, *extra_tags])),
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
        "GSVA ([CVPR 2024](https://openaccess.thecvf.com/content/CVPR2024/html/Xia_GSVA_Generalized_Segmentation_via_"
        "Multimodal_Large_Language_Models_CVPR_2024_paper.html), [original code](https://github.com/LeapLabTHU/GSVA)) "
        "segments what a sentence describes. LLaVA reads the image and the question and answers with one `[SEG]` "
        "token per target that is present and one `[REJ]` token per target that is not; each `[SEG]` state becomes a "
        "prompt of Segment Anything's mask decoder. One answer can therefore segment several objects and say "
        "explicitly that a described object is absent.",
        "This repository is a transformers-native port: it loads with `AutoModelForCausalLM` / `AutoProcessor` and "
        "`trust_remote_code=True`, and `model.segment(...)` generates the answer and returns one mask per target.",
        "## Model details",
        model_details(config, parameters, dtype),
        "## Usage",
        "```python\n" + usage_snippet(repo_id, targets, with_example) + "\n```",
        "`model.segment(processor, images, text=... | targets=[...])` returns, per image, the generated `answer` and "
        "`targets`, each with `phrase`, `rejected`, `mask` (bool, original image size; all False when rejected), "
        "`score` (probability of the model's own `[SEG]`/`[REJ]` choice) and `mask_score`. `text` is a question used "
        "as typed; `targets` are phrases put into GSVA's multi-target question. Extra keyword arguments go to "
        "`generate()`; `batch_size` controls batched generation.",
        "### Pin a revision",
        "`trust_remote_code=True` downloads and runs the Python files of this repository (`configuration_gsva.py`, "
        '`modeling_gsva.py`, `processing_gsva.py`). Read them, then pass `revision="<commit hash>"` to both '
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
            '"–" marks a metric the data leave undefined.',
        ]
    sections += [
        "## Files",
        "`model*.safetensors` (+ `model.safetensors.index.json` when sharded), `config.json` (with `auto_map`), "
        "`generation_config.json`, `processor_config.json`, `tokenizer.json`, `tokenizer_config.json`, and the code "
        "files `configuration_gsva.py`, `modeling_gsva.py`, `processing_gsva.py` (they import only torch, "
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
    """Whether `out_dir` holds an earlier layout to remove; anything else that is not empty is refused."""
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir}: exists and is not a folder")
    if not any(out_dir.iterdir()):
        return False
    if not overwrite:
        raise FileExistsError(f"--out {out_dir}: not empty; pass --overwrite to replace an earlier gsva-push layout")
    try:
        earlier = json.loads((out_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        earlier = None
    if earlier != "gsva" or not (out_dir / "README.md").is_file():
        raise FileExistsError(f"--out {out_dir}: not empty and not an earlier gsva-push layout; refusing to delete it")
    return True


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
    targets: list[str] = DEFAULT_TARGETS,
    example_image: str | Path | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write the repository folder; returns its file names. Inputs are all checked before anything is written."""
    import torch
    from transformers.utils.hub import convert_file_size_to_int

    from modeling_gsva import GSVAForCausalLM
    from processing_gsva import GSVAProcessor

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_model_dir(model_dir)
    if eval_names and len(eval_names) != len(eval_jsons):
        raise ValueError(f"--eval-name given {len(eval_names)} times but --eval-json {len(eval_jsons)} times")
    evals = []
    for index, path in enumerate(eval_jsons):
        payload = read_eval_json(Path(path))
        dataset = dataset_parts(payload["val_dataset"])[0]
        evals.append((eval_names[index] if eval_names else DATASET_NAMES.get(dataset.lower(), dataset), payload))
    if license == "other" and not (license_name and license_link):
        raise ValueError("--license other needs --license-name and --license-link")
    if not targets:
        raise ValueError("--example-targets holds no phrase")
    clear = check_out_dir(out_dir, overwrite)
    if example_image is not None and not Path(example_image).is_file():
        raise FileNotFoundError(f"--example-image {example_image}: no such file")
    try:
        shard_bytes = convert_file_size_to_int(max_shard_size)
    except ValueError:
        shard_bytes = 0
    if shard_bytes <= 0:
        raise ValueError(f"--max-shard-size {max_shard_size!r}: expected a positive size such as 5GB or 500MB")
    dtypes = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"--dtype must be one of {sorted(dtypes)}, got {dtype!r}")

    model = GSVAForCausalLM.from_pretrained(model_dir, dtype=dtypes[dtype]).eval()
    processor = GSVAProcessor.from_pretrained(model_dir)
    processor.check_config(model.config)
    if clear:
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    processor.save_pretrained(out_dir)
    if example_image is not None:
        from PIL import Image

        Image.open(example_image).convert("RGB").save(out_dir / EXAMPLE_NAME)
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
    )
    card.save(out_dir / "README.md")
    return check_layout(out_dir)


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
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gsva-push", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="saved GSVA folder (config, weights, processor)")
    parser.add_argument("repo_id", help="Hub repository, e.g. user/gsva-7b")
    parser.add_argument("--out", type=Path, help="folder to lay out (required with --dry-run; else a temporary one)")
    parser.add_argument("--dry-run", action="store_true", help="only write the folder, upload nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier gsva-push layout in --out")
    parser.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE, help="safetensors shard size (default 5GB)")
    parser.add_argument(
        "--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="weights dtype to save"
    )
    parser.add_argument("--eval-json", action="append", default=[], type=Path, help="eval_hf.py JSON (repeatable)")
    parser.add_argument("--eval-name", action="append", default=[], help="display name per --eval-json, same order")
    parser.add_argument("--no-model-index", action="store_true", help="results table only, no model-index metadata")
    parser.add_argument("--base-model", action="append", default=[], help="parent model id (repeatable)")
    parser.add_argument("--base-model-relation", choices=["finetune", "merge", "adapter", "quantized"])
    parser.add_argument(
        "--license", default="apache-2.0", help="license id (default apache-2.0; 'other' + name + link)"
    )
    parser.add_argument("--license-name")
    parser.add_argument("--license-link")
    parser.add_argument("--dataset", action="append", default=[], help="training dataset id (repeatable)")
    parser.add_argument("--tag", action="append", default=[], help="extra tag (repeatable)")
    parser.add_argument(
        "--example-targets", default="; ".join(DEFAULT_TARGETS), help='phrases for the card snippet, ";"-separated'
    )
    parser.add_argument(
        "--example-image", type=Path, help=f"image shipped as {EXAMPLE_NAME} (default: the bundled one)"
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
    example = args.example_image or (BUNDLED_EXAMPLE if BUNDLED_EXAMPLE.is_file() else None)
    targets = [p.strip() for p in args.example_targets.split(";") if p.strip()]

    with tempfile.TemporaryDirectory(prefix="gsva-push-") as scratch:
        out_dir = args.out or Path(scratch) / "repo"
        try:
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
                example_image=example,
                overwrite=args.overwrite,
            )
        except (OSError, ValueError) as error:
            print(f"gsva-push: error: {error}", file=sys.stderr)
            return 2
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
