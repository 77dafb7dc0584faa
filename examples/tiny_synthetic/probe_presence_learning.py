"""Can the tiny preset's CLIP + language model learn to read the image? Yes/no questions only, from scratch.

The embedded default's presence decisions turn out not to depend on the image (`diagnose_synthetic.py`). This
isolates the language side: a fresh model is trained with CE alone on one-round yes/no questions and scored on
val images every `--eval-every` steps (accuracy of "Yes" vs "No" where the answer gives it, 50% = chance).

  text       "Is there red in this image?", answer fixed by the colour word (needs no image): the control
  uniform    the whole image is one palette colour; "Is there <colour> ...?" (the image fills every token)
  color      synthetic val/train images; is any shape of that colour present? (absent colours are absent)
  shape      synthetic images; "Is there a <colour> <shape> ...?" with hard negatives (the GRES decision)
  scene-text the shape questions with the scene written out as words before them on a grey image ("The image
             shows a red circle, a blue square."): needs no vision at all, only the language model's lookup

`--answer named` makes the answer repeat the target before deciding ("The red square: No."), as GSVA's answers do
("the red square:[REJ]"): the decision then sits right after the phrase, one lookup fewer than "Yes."/"No." alone.
A `--preset` folder with weights (e.g. from `probe_vision_features.py --save`) starts from them; `--freeze-vision`
keeps its tower and projector as they are, `--embedding-init-std` redraws the word embeddings, `--lm-init-std` the whole
language model.

    python examples/tiny_synthetic/probe_presence_learning.py --mode color --steps 1500
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from configuration_gsva import GSVAConfig  # noqa: E402
from examples.tiny_synthetic.diagnose_synthetic import image_inputs  # noqa: E402
from examples.tiny_synthetic.from_scratch import draw_input_embeddings, draw_language_model  # noqa: E402
from examples.tiny_synthetic.vision_pretraining import vision_parts  # noqa: E402
from gsva_hf.data.collator import GSVACollator  # noqa: E402
from gsva_hf.data.sample import Sample  # noqa: E402
from gsva_hf.data.synthetic import IMAGE_SUBDIR, PALETTE, read_image_contents  # noqa: E402
from gsva_hf.training import folder_has_weights  # noqa: E402
from modeling_gsva import GSVAForCausalLM  # noqa: E402
from processing_gsva import GSVAProcessor, load_image  # noqa: E402

MODES = ("text", "uniform", "color", "shape", "scene-text")
ANSWER_FORMS = ("short", "named")


class PresenceQuestions:
    """Balanced yes/no questions about the synthetic images of one split (or plain colour images)."""

    def __init__(self, dataset_dir: Path, split: str, mode: str, answer_form: str = "short"):
        if mode not in MODES or answer_form not in ANSWER_FORMS:
            raise ValueError(f"mode must be one of {MODES} and answer_form one of {ANSWER_FORMS}")
        self.mode, self.answer_form, self.root = mode, answer_form, dataset_dir
        self.images, self.objects = read_image_contents(dataset_dir, split)
        pairs = set().union(*self.objects.values())
        self.colors = sorted({c for c, _ in pairs})
        self.shapes = sorted({s for _, s in pairs})
        self._cache: dict[int, Image.Image] = {}

    def image(self, record: dict) -> Image.Image:
        if record["id"] not in self._cache:
            self._cache[record["id"]] = load_image(self.root / IMAGE_SUBDIR / record["file_name"])
        return self._cache[record["id"]]

    def draw(self, rng: np.random.Generator) -> Sample:
        yes, image_id, scene = bool(rng.random() < 0.5), None, ""
        if self.mode in ("text", "uniform"):
            color = self.colors[rng.integers(len(self.colors))]
            if self.mode == "text":
                image = Image.new("RGB", (128, 128), (128, 128, 128))
                target, yes = color, color in self.colors[: len(self.colors) // 2]
            else:
                image = Image.new("RGB", (128, 128), PALETTE[color])
                others = [c for c in self.colors if c != color]
                target = color if yes else others[rng.integers(len(others))]
        else:
            record = self.images[rng.integers(len(self.images))]
            image_id = record["id"]
            image, present = self.image(record), sorted(self.objects[record["id"]])
            if self.mode == "color":
                present_colors = sorted({c for c, _ in present})
                absent = [c for c in self.colors if c not in present_colors]
                pool = present_colors if yes or not absent else absent
                yes = yes or not absent
                target = pool[rng.integers(len(pool))]
            else:
                absent = [(c, s) for c in self.colors for s in self.shapes if (c, s) not in present]
                hard = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
                pool = present if yes else (hard or absent)
                target = "a " + " ".join(pool[rng.integers(len(pool))])
                if self.mode == "scene-text":
                    image = Image.new("RGB", image.size, (128, 128, 128))
                    listed = ", ".join(f"a {c} {s}" for c, s in (present[i] for i in rng.permutation(len(present))))
                    scene = f"The image shows {listed}. "
        question = f"{scene}Is there {target} in this image?"
        answer = "Yes." if yes else "No."
        if self.answer_form == "named":
            answer = f"The {target.removeprefix('a ')}: {answer}"
        masks = np.zeros((0, image.height, image.width), bool)
        return Sample(image=image, rounds=[(question, answer)], masks=masks, meta={"image_id": image_id})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", type=Path, default=ROOT / "configs" / "gsva-tiny")
    parser.add_argument("--dataset_dir", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument("--mode", choices=MODES, default="color")
    parser.add_argument("--answer", choices=ANSWER_FORMS, default="short", help="named: 'The red square: No.'")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--embedding-init-std", type=float, default=None,
        help="redraw the language model's input embeddings with this std (train_tiny.py --embedding_init_std)",
    )
    parser.add_argument(
        "--lm-init-std", type=float, default=None,
        help="redraw every linear layer and embedding of the language model with this std (biases zero), from a "
        "generator seeded with --seed + 1; the preset's weights are otherwise kept",
    )
    parser.add_argument(
        "--lm-init-modules", default="", help="with --lm-init-std: only these layers (name endings, e.g. q_proj,k_proj)"
    )
    parser.add_argument("--freeze-vision", action="store_true", help="train only the language model (and lm_head)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    processor = GSVAProcessor.from_pretrained(args.preset)
    if folder_has_weights(args.preset):
        model = GSVAForCausalLM.from_pretrained(args.preset).train()
    else:
        model = GSVAForCausalLM._from_config(GSVAConfig.from_pretrained(args.preset)).train()
    if args.lm_init_std is not None:
        generator = torch.Generator().manual_seed(args.seed + 1)
        draw_language_model(model, args.lm_init_std, args.lm_init_modules, generator=generator, flag="--lm-init-std")
    if args.embedding_init_std is not None:
        draw_input_embeddings(model, args.embedding_init_std, flag="--embedding-init-std")
    if args.freeze_vision:
        for part in vision_parts(model):
            part.requires_grad_(False)
    train = PresenceQuestions(args.dataset_dir, "train", args.mode, args.answer)
    val_questions = PresenceQuestions(args.dataset_dir, "val", args.mode, args.answer)
    collator = GSVACollator(processor)
    val_rng = np.random.default_rng(args.seed + 1)
    val_batch = collator([val_questions.draw(val_rng) for _ in range(200)])
    yes_id, no_id = (processor.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("Yes", "No"))
    decides = (val_batch["labels"] == yes_id) | (val_batch["labels"] == no_id)
    if not bool(decides.any(1).all()):
        raise RuntimeError("an answer holds no 'Yes' / 'No' token where the tokenizer puts it in a bare answer")
    answer_at = decides.float().argmax(1)
    truth = val_batch["labels"][torch.arange(len(answer_at)), answer_at]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.95))
    rng, start = np.random.default_rng(args.seed), time.perf_counter()
    print("| mode | step | samples | seconds | loss | val accuracy |\n|---|---|---|---|---|---|")
    for step in range(1, args.steps + 1):
        batch = collator([train.draw(rng) for _ in range(args.batch_size)])
        loss = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
            **image_inputs(batch),
        ).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                logits = model(
                    input_ids=val_batch["input_ids"], attention_mask=val_batch["attention_mask"],
                    **image_inputs(val_batch),
                ).logits[torch.arange(len(answer_at)), answer_at - 1]
            model.train()
            said_yes = logits[:, yes_id] > logits[:, no_id]
            accuracy = (said_yes == (truth == yes_id)).float().mean().item()
            print(
                f"| {args.mode} | {step} | {step * args.batch_size} | {time.perf_counter() - start:.0f} | "
                f"{loss.item():.3f} | {accuracy:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
