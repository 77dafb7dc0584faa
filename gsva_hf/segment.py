"""`gsva-segment IMAGE_OR_FOLDER TEXT --out OUT/`: one PNG per target, an overlay, and a JSON per image.

TEXT holds phrases separated by ";" or new lines, and the model decides each one (present with a mask, or
rejected); a single line ending with "?" is a question instead, and the model's own answer decides the targets.
Exit status 0: every image and every target has a result; 1: some image failed (its outputs not written
included) or some target went undecided (each named on stderr and in OUT/summary.json), or OUT/summary.json
could not be written; 2: a usage error (an --out where no file can be created included, before the model loads).
"""

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .cli import CommandParser, check_creatable, describe, naming_file, refuse_link, usage_errors, write_text_replacing
from .cpu_memory import MALLOC_CHOICES, apply_malloc_choice
from .loading import BUNDLED_MODEL, DTYPES, add_loading_arguments, load_gsva_pinned
from .overlay import overlay
from .queries import check_result, describe_query, parse_query
from .rle import compressed_rle

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm"}
DEFAULT_MODEL = BUNDLED_MODEL  # --model when none is given
SUMMARY = "summary.json"
# What marks a summary.json as this command's own: only such a summary's `files` are ever removed by a rerun.
WRITTEN_BY = "gsva-segment"
SUMMARY_FORMAT = 1


# ---------------------------------------------------------------------------------------------------- outputs
def collect_images(path: Path) -> tuple[list[Path], list[Path]]:
    """The images to segment and the folder entries that are not images (reported, not silently skipped)."""
    if path.is_dir():
        entries = sorted(path.iterdir())
        images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise FileNotFoundError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
        return images, [p for p in entries if p not in images]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file or folder")
    return [path], []


def output_folders(images: list[Path], out: Path, single: bool) -> list[Path]:
    """One folder per image named by its full file name (`a.jpg/`, `a.png/`): names never collide, also on
    case-insensitive file systems (checked)."""
    if single:
        return [out]
    seen = {}
    for image in images:
        other = seen.setdefault(image.name.casefold(), image)
        if other is not image:
            raise ValueError(f"{other.name} and {image.name} differ only in case: their output folders would collide")
    return [out / image.name for image in images]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "target"


# The files gsva-segment writes, in OUT (one image) or in a per-image folder OUT/<image file name>/.
IMAGE_FILE_NAMES = re.compile(r"mask_\d{2,}_[a-z0-9_]{1,40}\.png|overlay\.png|result\.json")


def skip_reason(path: Path) -> str:
    """Why a folder entry is not segmented, as written on stderr and in summary.json."""
    if path.is_dir():
        return "a folder (sub-folders are not searched)"
    return f"not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})"


class OutputFolder:
    """`--out`: remembers in summary.json every file this command wrote, so a rerun removes exactly those (and
    refuses a folder holding anything else: no stale mask can sit beside a new result). Nothing is written or
    removed through a symbolic link, and a summary.json listing a file the command never writes is refused, as is
    one without the `written_by`/`format` marker the command writes (any JSON file can list a user's files)."""

    def __init__(self, root: Path, header: dict, folders: list[Path] = ()):
        self.root = root
        self.folders = list(folders)  # where this run writes: OUT itself (one image) or one folder per image
        self.summary = {"written_by": WRITTEN_BY, "format": SUMMARY_FORMAT, **header, "images": [], "skipped": [], "files": []}

    def _refuse(self, path: Path, problem: str) -> None:
        raise ValueError(f"--out {self.root}: {path.relative_to(self.root)} {problem}; give an empty or new folder")

    def _listed(self, name) -> Path:
        """One entry of an earlier summary.json's `files`, checked to be a file this command writes: a name
        `IMAGE_FILE_NAMES` matches, in OUT or in a per-image folder (named after an image file), resolving inside
        OUT."""
        parts = name.split("/") if isinstance(name, str) else []
        ok = 1 <= len(parts) <= 2 and IMAGE_FILE_NAMES.fullmatch(parts[-1]) is not None
        if ok and len(parts) == 2:
            ok = parts[0] not in ("", ".", "..") and Path(parts[0]).suffix.lower() in IMAGE_SUFFIXES
        path = self.root.joinpath(*parts) if ok else None
        if path is None or path.resolve().parent not in (self.root.resolve(), self.root.resolve() / parts[0]):
            raise ValueError(
                f"--out {self.root}: {SUMMARY} lists {name!r}, which is not a file gsva-segment writes (mask_NN_*.png, "
                f"overlay.png, result.json, in OUT or in a per-image folder); refusing to delete it: give an empty or "
                "new folder"
            )
        return path

    def previous_files(self) -> list[Path]:
        """The files an earlier run here wrote; raises when the folder holds anything else, a symbolic link, or
        a folder where this run writes a file."""
        refuse_link(self.root, "--out")
        if not self.root.exists():
            return []
        if not self.root.is_dir():
            raise ValueError(f"--out {self.root} is a file; give a folder")
        entries = []
        for folder, dirs, files in os.walk(self.root):
            for name in sorted(dirs + files):
                path = Path(folder, name)
                if path.is_symlink():
                    self._refuse(path, "is a symbolic link (gsva-segment never writes or deletes through one)")
                entries.append(path)
        record, ours = self.root / SUMMARY, []
        if record.is_dir():
            self._refuse(record, f"is a folder; gsva-segment writes its {SUMMARY} file there")
        if record.is_file():
            try:
                written = json.loads(record.read_text())
                listed = written["files"]
                marked = (written.get("written_by"), written.get("format")) == (WRITTEN_BY, SUMMARY_FORMAT)
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(f"--out {self.root}: {SUMMARY} is not one gsva-segment wrote ({error})") from error
            if not marked:
                raise ValueError(
                    f"--out {self.root} holds files gsva-segment did not write: its {SUMMARY} lacks the marker "
                    f'"written_by": "{WRITTEN_BY}", "format": {SUMMARY_FORMAT} (a summary of an earlier version, or '
                    "another program's file); give a new --out"
                )
            if not isinstance(listed, list):
                raise ValueError(f"--out {self.root}: {SUMMARY} is not one gsva-segment wrote ('files' is not a list)")
            ours = [self._listed(name) for name in listed] + [record]
        known = set(ours)
        left = sorted(str(p.relative_to(self.root)) for p in entries if not p.is_dir() and p not in known)
        if left:
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            raise ValueError(
                f"--out {self.root} holds files gsva-segment did not write ({shown}); give an empty or new folder"
            )
        for path in entries:  # a folder where this run writes a file, and that no removal empties
            if path.is_dir() and path.parent in self.folders and IMAGE_FILE_NAMES.fullmatch(path.name):
                if not any(p.parent == path for p in known) or any(p not in known for p in path.iterdir()):
                    self._refuse(path, "is a folder; gsva-segment writes a file of that name there")
        return ours

    def remove(self, files: list[Path]) -> None:
        for path in files:
            if path.is_file() and not path.is_symlink():
                path.unlink()
        for folder in sorted({p.parent for p in files}, key=lambda p: len(p.parts), reverse=True):
            if folder != self.root and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def skip(self, path: Path, reason: str) -> None:
        """Record a folder entry that was not segmented, so summary.json accounts for every entry."""
        self.summary["skipped"].append({"file": str(path), "reason": reason})
        self.flush()

    def track(self, paths: list[Path]) -> None:
        """Record files before writing them, so a run that dies halfway still knows what to clean."""
        self.summary["files"] += [str(p.relative_to(self.root)) for p in paths]
        self.flush()

    def flush(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        record = self.root / SUMMARY
        if record.is_symlink():
            raise FileExistsError(
                f"--out {self.root}: {SUMMARY} is a symbolic link; gsva-segment never writes through one"
            )
        write_text_replacing(record, json.dumps(self.summary, indent=2, allow_nan=False) + "\n")


def _write_new(path: Path, write) -> None:
    """Create `path` (`_new_file`) and fill it with `write(handle)`; a failed write (a full disk above all) removes
    the partial file and raises an OSError naming `path`."""
    handle = _new_file(path)
    try:
        with handle:
            write(handle)
    except OSError as error:
        path.unlink(missing_ok=True)
        raise naming_file(error, path) from error


def _new_file(path: Path):
    """Open `path` for writing only if nothing is there (a link included): outputs never go through a link."""
    try:
        return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")
    except FileExistsError as error:
        raise FileExistsError(f"{path} appeared while gsva-segment was writing; it writes only new files") from error


def write_outputs(image_path: Path, image: Image.Image, query: dict, result, folder: Path, out: OutputFolder) -> dict:
    """Masks, overlay and result.json for one image."""
    masks, entries = [], []
    for index, target in enumerate(result.targets):
        mask = target.mask.numpy()
        entry = {
            "phrase": target.phrase,
            "rejected": target.rejected,
            "score": round(target.score, 6),
            "mask_score": round(target.mask_score, 6),
            "area": int(mask.sum()),
            "rle": compressed_rle(mask),
        }
        if "targets" in query and index < len(query["targets"]):
            entry["asked"] = query["targets"][index]
        if not target.rejected:
            entry["mask_png"] = f"mask_{index:02d}_{slug(target.phrase)}.png"
            masks.append((folder / entry["mask_png"], mask))
        entries.append(entry)
    out.track([path for path, _ in masks] + [folder / "overlay.png", folder / "result.json"])
    folder.mkdir(parents=True, exist_ok=True)
    if folder != out.root and folder.is_symlink():
        raise FileExistsError(f"{folder} is a symbolic link; gsva-segment never writes through one")
    for path, mask in masks:
        _write_new(path, lambda handle, mask=mask: Image.fromarray(mask.astype(np.uint8) * 255).save(handle, format="PNG"))
    picture = overlay(image, result)
    _write_new(folder / "overlay.png", lambda handle: picture.save(handle, format="PNG"))
    record = {
        "image": str(image_path),
        **describe_query(query),
        "answer": result.answer,
        "targets": entries,
        "problems": check_result(result, query),
    }
    text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    _write_new(folder / "result.json", lambda handle: handle.write(text.encode()))
    return record


def segment_batch(model, processor, pictures: list, query: dict, options: dict) -> list:
    """`model.segment` over a batch; when it fails, image by image, so one bad image costs only itself."""
    try:
        return model.segment(processor, pictures, **query, **options)
    except ValueError as error:
        if len(pictures) == 1:
            return [error]
    results = []
    for picture in pictures:
        try:
            results += model.segment(processor, [picture], **query, **options)
        except ValueError as error:
            results.append(error)
    return results


# ---------------------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="gsva-segment",
        description=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("image", metavar="IMAGE_OR_FOLDER", type=Path, help="an image file or a folder of images")
    parser.add_argument("text", metavar="TEXT", nargs="?", help='phrases separated by ";" or new lines, or one question ending with "?"')
    parser.add_argument("--targets", help='phrases separated by ";" (instead of TEXT; never read as a question)')
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="saved GSVA folder or Hub repo id")
    add_loading_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per image of a folder)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model weights' dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--load-in", choices=["4bit", "8bit"], help="quantize the LLM with bitsandbytes (GPU)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per model call")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length for a question (phrases need none)")
    parser.add_argument("--threshold", type=float, default=0.0, help="mask logit threshold")
    parser.add_argument(
        "--cpu-malloc",
        choices=MALLOC_CHOICES,
        default="keep",
        help="on the CPU, keep: glibc's malloc keeps freed memory for the next batch; default: the C library's own",
    )
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.text is None) == (args.targets is None):
        parser.error("give TEXT or --targets (one of them)")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not math.isfinite(args.threshold):
        parser.error(f"--threshold must be a finite number, got {args.threshold}")
    apply_malloc_choice(args.cpu_malloc, args.device)
    with usage_errors(parser.prog, args.debug):
        try:
            query = parse_query(args.text) if args.targets is None else parse_query(args.targets, allow_question=False)
            images, skipped = collect_images(args.image)
            folders = output_folders(images, args.out, single=not args.image.is_dir())
            out = OutputFolder(args.out, {"model": str(args.model), **describe_query(query)}, folders)
            previous = out.previous_files()
            check_creatable(args.out, "--out")
            model, processor = load_gsva_pinned(
                args.model, args.dtype, args.device, args.load_in, args.trust_remote_code, args.revision
            )
            if "targets" in query:  # phrases target mode cannot write (only full stops) are a usage error, before any image
                processor.targets_conversation(query["targets"])
        except (ImportError, RuntimeError, AssertionError) as error:
            if args.debug:
                raise
            parser.error(f"cannot load the model with --device {args.device} --load-in {args.load_in}: {error}")
    out.remove(previous)
    unrecorded = []  # summary.json writes that failed (a full disk): said once, and the exit status is 1

    def flush_summary(change) -> None:
        try:
            change()
        except OSError as error:
            if not unrecorded:
                print(f"error: {describe(error)}", file=sys.stderr)
            unrecorded.append(error)

    for entry in skipped:
        flush_summary(lambda entry=entry: out.skip(entry, skip_reason(entry)))
        print(f"note: {entry} is {skip_reason(entry)}; skipped", file=sys.stderr)

    from tqdm.auto import tqdm

    from processing_gsva import load_image

    options = {"max_new_tokens": args.max_new_tokens, "threshold": args.threshold, "batch_size": args.batch_size}
    failed = []
    progress = tqdm(total=len(images), unit="image", disable=len(images) == 1, file=sys.stderr)

    def report(path: Path, folder: Path, problems: list[str]) -> None:
        entry = {"image": str(path), "output": str(folder.relative_to(args.out)) if folder != args.out else "."}
        entry.update({"status": "failed", "problems": problems} if problems else {"status": "ok"})
        out.summary["images"].append(entry)
        flush_summary(out.flush)
        if problems:
            failed.append(path)
            progress.write(f"error: {path}: {'; '.join(problems)}", file=sys.stderr)

    for start in range(0, len(images), args.batch_size):
        loaded = []
        for path, folder in zip(images[start : start + args.batch_size], folders[start : start + args.batch_size]):
            try:
                loaded.append((path, folder, load_image(path)))
            except ValueError as error:
                report(path, folder, [str(error)])
        results = segment_batch(model, processor, [picture for _, _, picture in loaded], query, options) if loaded else []
        if len(results) != len(loaded):
            results = [ValueError(f"model.segment gave {len(results)} results for {len(loaded)} images")] * len(loaded)
        for (path, folder, picture), result in zip(loaded, results):
            if isinstance(result, Exception):
                report(path, folder, [str(result)])
                continue
            try:
                record = write_outputs(path, picture, query, result, folder, out)
            except OSError as error:  # a full disk, a folder that turned read-only: this image has no result
                report(path, folder, [f"its outputs could not be written: {describe(error)}"])
                continue
            present = [t["phrase"] for t in record["targets"] if not t["rejected"]]
            absent = [t["phrase"] for t in record["targets"] if t["rejected"]]
            progress.write(f"{path.name}: {result.answer!r} -> present {present}, not present {absent}")
            report(path, folder, record["problems"])
        progress.update(min(args.batch_size, len(images) - start))
    progress.close()
    if unrecorded:
        print(f"error: {args.out / SUMMARY} could not be written {len(unrecorded)} times; it may miss results", file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} of {len(images)} images have no complete result (see {args.out / SUMMARY})", file=sys.stderr)
    return 1 if failed or unrecorded else 0


if __name__ == "__main__":
    raise SystemExit(main())
