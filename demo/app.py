"""Gradio demo: upload an image, name what to segment, see one colour per target and which targets GSVA rejects.

    pip install -e ".[demo]"
    python demo/app.py                                   # bundled tiny model on http://127.0.0.1:7860
    python demo/app.py --model path/or/user/repo --port 8080
    GSVA_DEMO_MODEL=path/to/gsva python demo/app.py

Phrases are separated by ";" or new lines and the model decides each one; a single line ending with "?" is used
as the question itself, so the model's answer decides the targets (the same rule as `gsva-segment`). Uploads go
through the project's image loader (bit depth, EXIF rotation, size limits), and a model folder's own code runs only
with `--trust-remote-code` (a Hub repo id then needs `--revision`). The page works offline: analytics are off, the
default theme's fonts are served locally, and a share link is only made with `--share`.
"""

import math
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from gsva_hf.cli import CommandParser, usage_errors  # noqa: E402
from gsva_hf.loading import BUNDLED_MODEL, DTYPES, add_loading_arguments, load_gsva_pinned  # noqa: E402
from gsva_hf.overlay import overlay  # noqa: E402
from gsva_hf.queries import check_result, parse_query  # noqa: E402
from processing_gsva import load_image  # noqa: E402

EXAMPLE_IMAGE = REPO / "gsva_hf" / "assets" / "example.png"
EXAMPLE_TEXT = "the red circle; the blue square; the green star"
TABLE_HEADERS = ["phrase", "present", "score", "mask score", "pixels"]
MODEL_ENV = "GSVA_DEMO_MODEL"


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
        """`image`: the uploaded file's path (or a PIL image); the project's own errors are shown on the page."""
        if image is None:
            raise gr.Error("Upload an image first.")
        try:
            query = parse_query(text)
            image = load_image(image, name=Path(image).name if isinstance(image, (str, Path)) else "the upload")
            result = model.segment(processor, image, **query, **segment_kwargs)[0]
        except ValueError as error:
            raise gr.Error(str(error)) from error
        rows, summary = describe(result)
        problems = check_result(result, query)
        if problems:
            summary += "\n\n**Incomplete:** " + "; ".join(problems)
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
                image = gr.Image(type="filepath", image_mode=None, label="Image", elem_id="input-image")
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


def main(argv=None) -> int:
    parser = CommandParser(prog="demo/app.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=os.environ.get(MODEL_ENV, str(BUNDLED_MODEL)),
        help=f"GSVA folder or Hub repo id (${MODEL_ENV} sets the default)",
    )
    add_loading_arguments(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model weights' dtype")
    parser.add_argument("--device", default=None, help="torch device (None: cuda when available, else cpu)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for a LAN)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length for a question (phrases need none)")
    parser.add_argument("--threshold", type=float, default=0.0, help="mask logit threshold")
    args = parser.parse_args(argv)

    import torch

    if not 0 < args.port < 65536:
        parser.error(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not math.isfinite(args.threshold):
        parser.error(f"--threshold must be a finite number, got {args.threshold}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as error:
        parser.error(f"--device {device!r} is not a torch device ({error}); give e.g. cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: torch sees no CUDA device on this machine; give --device cpu")
    with usage_errors(parser.prog, args.debug):
        try:
            model, processor = load_gsva_pinned(
                args.model, args.dtype, device, trust_remote_code=args.trust_remote_code, revision=args.revision
            )
        except (ImportError, RuntimeError, AssertionError) as error:  # a device torch cannot use, as gsva-segment
            if args.debug:
                raise
            parser.error(f"cannot load the model with --device {device}: {error}")
    # Gradio opens each upload's header with Pillow before the callback; `load_image` then refuses, with the size and
    # limit on the page, anything over the project's lower limit before decoding it, so Pillow's own bomb error (an
    # unexplained page error) is switched off in the serving process.
    Image.MAX_IMAGE_PIXELS = None
    demo = build_demo(model, processor, {"max_new_tokens": args.max_new_tokens, "threshold": args.threshold})
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
