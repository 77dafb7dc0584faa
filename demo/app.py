"""Gradio demo: upload an image, name what to segment, see one colour per target and which targets GSVA rejects.

    pip install -e ".[demo]"
    python demo/app.py                                   # bundled tiny model on http://127.0.0.1:7860
    python demo/app.py --model path/or/user/repo --port 8080
    GSVA_DEMO_MODEL=path/to/gsva python demo/app.py

Phrases are separated by ";" or new lines and go into GSVA's multi-target question; a single line ending with "?"
is used as the question itself, so the model's answer decides the targets. The page works offline: analytics are
off, the default theme's fonts are served locally, and a share link is only made with `--share`.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gradio as gr  # noqa: E402

from gsva_hf.segment import DEFAULT_MODEL, DTYPES, load_model, overlay  # noqa: E402

EXAMPLE_IMAGE = REPO / "gsva_hf" / "assets" / "example.png"
EXAMPLE_TEXT = "the red circle; the blue square; the green star"
TABLE_HEADERS = ["phrase", "present", "score", "mask score", "pixels"]
MODEL_ENV = "GSVA_DEMO_MODEL"


def parse_query(text: str) -> dict:
    """`segment()` keyword arguments for what the user typed: `text=` for a question, else `targets=`."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if len(lines) == 1 and ";" not in lines[0] and lines[0].endswith("?"):
        return {"text": lines[0]}
    phrases = [part.strip() for line in lines for part in line.split(";") if part.strip()]
    if not phrases:
        raise ValueError("type a sentence, or phrases separated by ';' or new lines")
    return {"targets": phrases}


def describe(result) -> tuple[list[list], str]:
    """Table rows (one per target) and a one-line summary that names the rejected phrases."""
    rows = [
        [
            target.phrase or f"target {index}",
            "no (rejected)" if target.rejected else "yes",
            round(target.score, 3),
            round(target.mask_score, 3),
            int(target.mask.sum()),
        ]
        for index, target in enumerate(result.targets)
    ]
    rejected = [row[0] for row, target in zip(rows, result.targets) if target.rejected]
    if not result.targets:
        summary = "The answer holds no `[SEG]`/`[REJ]` token: nothing was segmented."
    elif rejected:
        summary = "**Not present (rejected):** " + ", ".join(rejected)
    else:
        summary = "Every target was found."
    return rows, summary


def make_predict(model, processor, segment_kwargs: dict | None = None):
    """The page's callback; `model` only needs `segment(processor, image, **query)`, so tests can force answers."""
    segment_kwargs = dict(segment_kwargs or {})

    def predict(image, text):
        if image is None:
            raise gr.Error("Upload an image first.")
        try:
            query = parse_query(text)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        image = image.convert("RGB")
        result = model.segment(processor, image, **query, **segment_kwargs)[0]
        rows, summary = describe(result)
        return overlay(image, result), rows, summary, result.answer

    return predict


def build_demo(
    model, processor, segment_kwargs: dict | None = None, example_image: Path | None = EXAMPLE_IMAGE
) -> gr.Blocks:
    """The page for a loaded model (see `make_predict`); the example row appears when the example image exists."""
    predict = make_predict(model, processor, segment_kwargs)
    with gr.Blocks(title="GSVA: generalized referring segmentation", analytics_enabled=False) as demo:
        gr.Markdown(
            "# GSVA: generalized referring segmentation\n"
            "Upload an image and name what to segment. Each target found gets its own colour; targets the model "
            "says are not in the image are listed as rejected."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Image", elem_id="input-image")
                text = gr.Textbox(
                    label="What to segment",
                    lines=3,
                    placeholder="phrases separated by ';' or one per line, or a question ending with '?'",
                    elem_id="query",
                )
                button = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column():
                picture = gr.Image(type="pil", label="Overlay", elem_id="overlay", interactive=False)
                summary = gr.Markdown(elem_id="summary")
                table = gr.Dataframe(headers=TABLE_HEADERS, label="Targets", interactive=False, elem_id="targets")
                answer = gr.Textbox(label="Model answer", interactive=False, elem_id="answer")
        if example_image is not None and Path(example_image).is_file():
            gr.Examples([[str(example_image), EXAMPLE_TEXT]], inputs=[image, text])
        button.click(predict, inputs=[image, text], outputs=[picture, table, summary, answer], api_name="segment")
    return demo


def resolve_model(name: str, revision: str | None = None) -> Path:
    """A local folder as is; anything else is taken as a Hub repo id and downloaded (or read from the cache)."""
    path = Path(name)
    if path.is_dir():
        return path
    if path == DEFAULT_MODEL:
        raise FileNotFoundError(f"the bundled model {DEFAULT_MODEL} is missing; pass --model FOLDER_OR_REPO_ID")
    if path.exists() or name.startswith((".", "/")) or name.count("/") != 1:
        raise FileNotFoundError(f"--model {name}: not a model folder and not a Hub repo id (NAMESPACE/NAME)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision))
    except OSError as error:
        raise FileNotFoundError(f"--model {name}: not in the local cache and not downloadable ({error})") from error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=os.environ.get(MODEL_ENV, str(DEFAULT_MODEL)),
        help=f"GSVA folder or Hub repo id (default: ${MODEL_ENV} or the bundled tiny model)",
    )
    parser.add_argument("--revision", help="Hub revision when --model is a repo id; pin a commit for remote code")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for a LAN)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.0, help="mask logit threshold")
    args = parser.parse_args(argv)

    import torch

    try:
        folder = resolve_model(args.model, args.revision)
        model, processor = load_model(
            folder, args.dtype, args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        )
    except (OSError, ValueError) as error:
        parser.error(str(error))
    demo = build_demo(model, processor, {"max_new_tokens": args.max_new_tokens, "threshold": args.threshold})
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
