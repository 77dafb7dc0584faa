"""`gsva-segment IMAGE_OR_FOLDER TEXT --model DIR --out OUT/`: one PNG per target, an overlay, and a JSON.

TEXT is a question when it ends with "?", otherwise the referring text put into GSVA's multi-target question
("What are TEXT in this image? ..."); the model's own answer decides how many targets there are and which
are absent. `--targets "a; b; c"` asks for explicit phrases instead.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "gsva-tiny-synthetic"
PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
]  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(model_dir: str | Path, dtype: str = "fp32", device: str = "cpu", load_in: str | None = None):
    """Model and processor from a saved folder; `load_in` "4bit"/"8bit" quantizes only the LLM (bitsandbytes).

    A folder that ships its code (a Hub-style export) loads through the Auto classes with `trust_remote_code`;
    one without code files (the bundled model) uses this installed project's classes.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json there; give a folder saved by GSVA")
    if (model_dir / "modeling_gsva.py").is_file():
        from transformers import AutoModelForCausalLM as model_class
        from transformers import AutoProcessor as processor_class

        kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": True}
    else:
        from modeling_gsva import GSVAForCausalLM as model_class
        from processing_gsva import GSVAProcessor as processor_class

        kwargs = {"dtype": DTYPES[dtype]}
    if load_in is not None:
        from transformers import BitsAndBytesConfig

        keep = ["sam", "vision_tower", "multi_modal_projector", "text_hidden_fcs", "lm_head"]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=load_in == "4bit", load_in_8bit=load_in == "8bit", llm_int8_skip_modules=keep
        )
        kwargs["device_map"] = device
    model = model_class.from_pretrained(model_dir, **kwargs).eval()
    if load_in is None:
        model = model.to(device)
    processor = processor_class.from_pretrained(model_dir, trust_remote_code="trust_remote_code" in kwargs)
    processor.check_config(model.config)
    return model, processor


def collect_images(path: Path) -> list[Path]:
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
        return images
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file or folder")
    return [path]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "target"


def mask_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def overlay(image: Image.Image, result) -> Image.Image:
    """Each present target tinted in its colour; a legend lists every phrase, rejected ones as not present."""
    base = np.asarray(image.convert("RGB")).astype(np.float32)
    for index, target in enumerate(result.targets):
        if not target.rejected:
            colour = np.array(PALETTE[index % len(PALETTE)], np.float32)
            mask = target.mask.numpy()
            base[mask] = 0.45 * base[mask] + 0.55 * colour
    picture = Image.fromarray(base.round().astype(np.uint8))
    font = ImageFont.load_default()
    line_height = 14
    legend_height = line_height * max(1, len(result.targets)) + 6
    canvas = Image.new("RGB", (max(picture.width, 260), picture.height + legend_height), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for index, target in enumerate(result.targets):
        top = picture.height + 3 + index * line_height
        colour = (160, 160, 160) if target.rejected else PALETTE[index % len(PALETTE)]
        draw.rectangle([4, top + 2, 14, top + 11], fill=colour)
        label = f"{target.phrase or f'target {index}'}" + (" - not present" if target.rejected else f" ({target.score:.2f})")
        draw.text((20, top), label, fill=(0, 0, 0), font=font)
    if not result.targets:
        draw.text((4, picture.height + 3), "no target in the answer", fill=(0, 0, 0), font=font)
    return canvas


def write_outputs(image_path: Path, image: Image.Image, question: str, result, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = []
    for index, target in enumerate(result.targets):
        mask = target.mask.numpy()
        entry = {
            "phrase": target.phrase,
            "rejected": target.rejected,
            "score": round(target.score, 6),
            "mask_score": round(target.mask_score, 6),
            "area": int(mask.sum()),
            "rle": mask_rle(mask),
        }
        if not target.rejected:
            name = f"mask_{index:02d}_{slug(target.phrase)}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(out_dir / name)
            entry["mask_png"] = name
        targets.append(entry)
    overlay(image, result).save(out_dir / "overlay.png")
    record = {"image": str(image_path), "question": question, "answer": result.answer, "targets": targets}
    (out_dir / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gsva-segment", description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path, help="an image file or a folder of images")
    parser.add_argument("text", nargs="?", help="question or referring text (see --targets)")
    parser.add_argument("--targets", help='explicit phrases separated by ";" (instead of TEXT)')
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="saved GSVA folder (default: bundled tiny model)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per image)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--load-in", choices=["4bit", "8bit"], help="quantize the LLM with bitsandbytes (GPU)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.0, help="mask logit threshold")
    args = parser.parse_args(argv)
    if (args.text is None) == (args.targets is None):
        parser.error("give TEXT or --targets (one of them)")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")

    from processing_gsva import load_image

    images = collect_images(args.image)
    model, processor = load_model(args.model, args.dtype, args.device, args.load_in)
    if args.targets is not None:
        phrases = [p.strip() for p in args.targets.split(";") if p.strip()]
        if not phrases:
            parser.error("--targets holds no phrase")
        question, call = processor.targets_question(phrases), {"targets": phrases}
    else:
        text = args.text.strip()
        if not text:
            parser.error("TEXT is empty")
        question = text if text.endswith("?") else processor.targets_question([text])
        call = {"text": question}

    from tqdm.auto import tqdm

    progress = tqdm(total=len(images), unit="image", disable=len(images) == 1, file=sys.stderr)
    for start in range(0, len(images), args.batch_size):
        paths = images[start : start + args.batch_size]
        pictures = [load_image(p) for p in paths]
        results = model.segment(
            processor, pictures, max_new_tokens=args.max_new_tokens, threshold=args.threshold, batch_size=args.batch_size, **call
        )
        for path, picture, result in zip(paths, pictures, results):
            folder = args.out / path.stem if len(images) > 1 else args.out
            record = write_outputs(path, picture, question, result, folder)
            present = [t["phrase"] for t in record["targets"] if not t["rejected"]]
            absent = [t["phrase"] for t in record["targets"] if t["rejected"]]
            progress.write(f"{path.name}: {result.answer!r} -> present {present}, not present {absent}")
        progress.update(len(paths))
    progress.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
