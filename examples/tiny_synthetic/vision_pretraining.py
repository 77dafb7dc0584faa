"""Stage 0 for from-scratch models on the synthetic task: give the CLIP tower what a pretrained CLIP brings.

GSVA starts from OpenAI's CLIP, whose patch features already tell colours and shapes apart; its language model only
learns to look them up. A tiny tower trained from scratch only through the language model's loss learns shapes far
too slowly (README.md beside this file). This stage is the tiny model's stand-in for CLIP's pretraining: the features
the language model reads (CLIP at `vision_feature_layer`, then the projector) learn, through a throwaway linear head,
either which colour+shape pairs each train image holds (`target="image"`: a head on their max- and mean-pool, the
embedded default), the colour+shape of the object under each patch (`target="patches"`: a head on every token,
labels from the instance masks) or both (`target="both"`). The same code, with the tower left as it is,
linear-probes a trained model's tokens.
"""

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn

from gsva_hf.data.synthetic import IMAGE_SUBDIR, MANIFEST_NAME, read_image_objects
from gsva_hf.training import progress_line

logger = logging.getLogger(__name__)


class _SplitImages:
    """One split's images (uint8 arrays), their objects, and `pairs`: every colour x shape the task's manifest
    declares, sorted (not only those a split happens to hold, so train and val labels always line up)."""

    def __init__(self, dataset_dir, split: str, loaded: "_SplitImages | None" = None):
        if loaded is not None:  # another label kind of the same split: share its images, do not read them again
            self.pairs, self.images, self.objects = loaded.pairs, loaded.images, loaded.objects
            self.files = loaded.files
            return
        records, objects = read_image_objects(dataset_dir, split)
        if not records:
            raise ValueError(f"{dataset_dir}: the synthetic task has no {split!r} images")
        manifest = Path(dataset_dir) / MANIFEST_NAME
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} not found: {dataset_dir} must hold the synthetic task")
        parameters = json.loads(manifest.read_text()).get("parameters", {})
        if not {"colors", "shapes"} <= set(parameters):
            raise ValueError(f"{manifest}: 'parameters' must list the task's 'colors' and 'shapes'")
        self.pairs = sorted((color, shape) for color in parameters["colors"] for shape in parameters["shapes"])
        root = Path(dataset_dir) / IMAGE_SUBDIR
        self.images, self.objects, self.files = [], [objects[record["id"]] for record in records], []
        for record, found in zip(records, self.objects):
            unknown = [o["id"] for o in found if (o["color"], o["shape"]) not in self.pairs]
            if unknown:
                raise ValueError(f"annotations {unknown} of image {record['id']}: colour+shape not in {manifest}")
            self.files.append(root / record["file_name"])
            with Image.open(self.files[-1]) as image:
                self.images.append(np.asarray(image.convert("RGB")))

    def __len__(self) -> int:
        return len(self.images)


class PresenceHead(nn.Module):
    def __init__(self, width: int, num_pairs: int):
        super().__init__()
        self.linear = nn.Linear(2 * width, num_pairs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([features.amax(1), features.mean(1)], dim=-1))


class ImageContentLabels(_SplitImages):
    """A 0/1 target per (colour, shape) pair, in `pairs` order: does the image hold one?"""

    def __init__(self, dataset_dir, split: str, loaded: _SplitImages | None = None):
        super().__init__(dataset_dir, split, loaded)
        held = [{(o["color"], o["shape"]) for o in objects} for objects in self.objects]
        self.targets = torch.tensor([[pair in pairs for pair in self.pairs] for pairs in held], dtype=torch.float32)

    def head(self, width: int) -> nn.Module:
        return PresenceHead(width, len(self.pairs))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(logits, targets)

    def scores(self, logits: torch.Tensor) -> dict:
        said, present = logits > 0, self.targets > 0
        return {
            "val_recall": (said & present).sum().item() / max(int(present.sum()), 1),
            "val_specificity": (~said & ~present).sum().item() / max(int((~present).sum()), 1),
        }


class PatchContentLabels(_SplitImages):
    """Per CLIP patch (row-major, `grid` x `grid`), the index in `pairs` of the object covering most of the patch,
    or `len(pairs)` (background) where no object covers `min_cover` of it. Images must be square: CLIP's processor
    then maps the whole image onto the grid."""

    def __init__(self, dataset_dir, split: str, grid: int, min_cover: float = 0.2):
        super().__init__(dataset_dir, split)
        self.background = len(self.pairs)
        for pixels, path in zip(self.images, self.files):
            if pixels.shape[0] != pixels.shape[1]:
                raise ValueError(f"{path}: patch labels need square images, got {pixels.shape[1]}x{pixels.shape[0]}")
        self.targets = torch.stack(
            [self._patch_targets(objects, pixels.shape[0], grid, min_cover) for pixels, objects in zip(self.images, self.objects)]
        )  # fmt: skip
        colours, shapes = sorted({c for c, _ in self.pairs}), sorted({s for _, s in self.pairs})
        self.colour_of = torch.tensor([colours.index(c) for c, _ in self.pairs] + [-1])  # background: -1
        self.shape_of = torch.tensor([shapes.index(s) for _, s in self.pairs] + [-1])

    def _patch_targets(self, objects: list[dict], size: int, grid: int, min_cover: float) -> torch.Tensor:
        masks = torch.stack([
            torch.from_numpy(mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(o["segmentation"], size, size))))
            for o in objects
        ]).float()  # fmt: skip
        cover = nn.functional.adaptive_avg_pool2d(masks[:, None], grid)[:, 0].flatten(1)
        best, index = cover.max(0)
        classes = torch.tensor([self.pairs.index((o["color"], o["shape"])) for o in objects])
        return torch.where(best >= min_cover, classes[index], self.background)

    def head(self, width: int) -> nn.Module:
        return nn.Linear(width, self.background + 1)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != targets.shape[1]:
            raise ValueError(
                f"the tower gives {logits.shape[1]} image tokens but the labels have {targets.shape[1]} patches: "
                "patch labels need vision_feature_select_strategy 'default' (CLS dropped) and "
                "grid = vision_config.image_size // vision_config.patch_size (patch_grid)"
            )
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def scores(self, logits: torch.Tensor) -> dict:
        """Accuracy on object patches (colour and shape both right; each alone) and on background patches."""
        said = logits.argmax(-1)
        right, on_object = said == self.targets, self.targets != self.background
        return {
            "val_object_accuracy": right[on_object].float().mean().item(),
            "val_colour_accuracy": (self.colour_of[said] == self.colour_of[self.targets])[on_object].float().mean().item(),
            "val_shape_accuracy": (self.shape_of[said] == self.shape_of[self.targets])[on_object].float().mean().item(),
            "val_background_accuracy": right[~on_object].float().mean().item(),
        }  # fmt: skip


class _BothHeads(nn.Module):
    def __init__(self, image: nn.Module, patches: nn.Module):
        super().__init__()
        self.image, self.patches = image, patches

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(features), self.patches(features)


class ImageAndPatchLabels:
    """Both kinds at once (`target="both"`): every token learns the pair under its patch while the tokens' pools
    still tell which pairs the image holds, so a language model's near-uniform first attention already reads a
    presence signal in which colour and shape are bound. `targets` and the head's logits are (image, patches) pairs."""

    def __init__(self, dataset_dir, split: str, grid: int, min_cover: float = 0.2):
        self.patches = PatchContentLabels(dataset_dir, split, grid, min_cover)
        self.image = ImageContentLabels(dataset_dir, split, loaded=self.patches)
        self.pairs, self.images = self.image.pairs, self.image.images
        self.targets = (self.image.targets, self.patches.targets)

    def __len__(self) -> int:
        return len(self.images)

    def head(self, width: int) -> nn.Module:
        return _BothHeads(self.image.head(width), self.patches.head(width))

    def loss(self, logits: tuple[torch.Tensor, ...], targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.image.loss(logits[0], targets[0]) + self.patches.loss(logits[1], targets[1])

    def scores(self, logits: tuple[torch.Tensor, torch.Tensor]) -> dict:
        return {**self.image.scores(logits[0]), **self.patches.scores(logits[1])}


def patch_grid(model, image_processor=None, image=None) -> int:
    """Side of the token grid one image becomes: CLIP's patches, or a composed VLM's tokens for `image` (a task
    image; Qwen-VL: its patch grid merged 2x2)."""
    if not model.model.is_composed:
        vision = model.config.vision_config
        return vision.image_size // vision.patch_size
    if image is None or image_processor is None:
        raise ValueError("a composed VLM's token grid depends on the image: give image_processor and a task image")
    grid = image_processor([image], return_tensors="pt").get("image_grid_thw")
    if grid is None or int(grid[0, 1]) != int(grid[0, 2]):
        raise ValueError("the vision stage of a composed VLM supports Qwen-VL families on square task images")
    return int(grid[0, 1]) // int(getattr(image_processor, "merge_size", 2))


def vision_parts(model) -> list[nn.Module]:
    """What the stage trains: CLIP and the projector, or a composed VLM's vision tower (Qwen-VL's merger inside)
    and its projector where it has one."""
    if not model.model.is_composed:
        return [model.vision_tower, model.multi_modal_projector]
    base = model.model.vlm.model
    parts = [model.vision_tower] + [getattr(base, name, None) for name in ("multi_modal_projector", "connector")]
    return [part for part in parts if part is not None]


def image_features(model, image_processor, images, reference: torch.Tensor) -> torch.Tensor:
    """`[B, tokens, width]`: the features the language model reads for each image, in grid order."""
    inputs = image_processor(list(images), return_tensors="pt")
    pixels = inputs["pixel_values"].to(reference.device, reference.dtype)
    if not model.model.is_composed:
        return model.get_image_features(pixels)
    extra = {k: v.to(reference.device) for k, v in inputs.items() if k != "pixel_values" and torch.is_tensor(v)}
    pooled = model.model.vlm.model.get_image_features(pixel_values=pixels, return_dict=True, **extra).pooler_output
    return torch.stack(list(pooled))


TARGETS = {
    "image": lambda dataset_dir, split, model, grid=None: ImageContentLabels(dataset_dir, split),
    "patches": lambda dataset_dir, split, model, grid=None: PatchContentLabels(dataset_dir, split, grid or patch_grid(model)),
    "both": lambda dataset_dir, split, model, grid=None: ImageAndPatchLabels(dataset_dir, split, grid or patch_grid(model)),
}


def _concat(chunks: list):
    """Batches of logits (a tensor, or a tuple of tensors for `target="both"`) joined along the batch, on the CPU."""
    if isinstance(chunks[0], tuple):
        return tuple(torch.cat([chunk[i] for chunk in chunks]).cpu() for i in range(len(chunks[0])))
    return torch.cat(chunks).cpu()


def _take(targets, index: list[int], device):
    """The rows `index` of a label kind's targets (a tensor, or a tuple of tensors for `target="both"`) on `device`."""
    if isinstance(targets, tuple):
        return tuple(part[index].to(device) for part in targets)
    return targets[index].to(device)


def train_vision_features(
    model, image_processor, train, val, steps: int, batch_size: int = 32, learning_rate: float = 1e-3,
    eval_every: int = 500, seed: int = 0, on_row=None, train_tower: bool = True, log_every: int = 0,
) -> list[dict]:  # fmt: skip
    """Train `model.vision_tower` and `model.multi_modal_projector` in place on `train` (any of `TARGETS`' label
    kinds; with `train_tower=False` only the head trains: a linear probe of the features as they are);
    return one row per evaluation on `val` (each also handed to `on_row` as it comes). Every other parameter and
    every `requires_grad` flag is left as it was. `log_every` > 0 prints a progress line every that many steps."""
    if type(train) is not type(val) or train.pairs != val.pairs:
        raise ValueError("train and val labels must be of one kind and one task (the same colour x shape pairs)")
    tower = vision_parts(model)
    parts = tower if train_tower else []
    flags = [(p, p.requires_grad) for part in parts for p in part.parameters()]
    modes = [(part, part.training) for part in tower]
    reference = next(tower[0].parameters())
    head = train.head(model.config.get_text_config().hidden_size).to(reference.device)
    params = [p for p, _ in flags]
    clipped = params or list(head.parameters())  # the tower's gradients are clipped; a probe's head's are
    optimizer = torch.optim.AdamW(params + list(head.parameters()), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0)
    generator = torch.Generator().manual_seed(seed)

    def logits(images) -> torch.Tensor:
        with torch.set_grad_enabled(train_tower and torch.is_grad_enabled()):
            features = image_features(model, image_processor, images, reference).float()
        return head(features)

    rows, start = [], time.perf_counter()
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(True)
        for part in tower:
            part.train(train_tower)
        for step in range(1, steps + 1):
            for part in parts:
                part.train()
            index = torch.randint(len(train), (batch_size,), generator=generator).tolist()
            loss = train.loss(logits(train.images[i] for i in index), _take(train.targets, index, reference.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clipped, 1.0)
            optimizer.step()
            if log_every > 0 and (step % log_every == 0 or step == steps):
                elapsed = time.perf_counter() - start
                line = progress_line(step, steps, elapsed, step, loss.item(), learning_rate=learning_rate, stage="vision")
                print(line, flush=True)
            if step % eval_every == 0 or step == steps or step == 1:
                for part in parts:
                    part.eval()
                with torch.no_grad():
                    said = _concat([logits(val.images[i : i + 64]) for i in range(0, len(val), 64)])
                rows.append({"step": step, "seconds": round(time.perf_counter() - start, 1), "loss": loss.item()})
                rows[-1].update(val.scores(said))
                if on_row:
                    on_row(rows[-1])
    finally:
        optimizer.zero_grad(set_to_none=True)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for part, mode in modes:
            part.train(mode)
    return rows


def task_grid(model, image_processor, dataset_dir) -> int:
    """`patch_grid` for the task's images: a composed VLM's grid depends on the image, so the first val image's."""
    if not model.model.is_composed:
        return patch_grid(model)
    return patch_grid(model, image_processor, _SplitImages(dataset_dir, "val").images[0])


def pretrain_vision(
    model, image_processor, dataset_dir, steps: int, batch_size: int = 32, learning_rate: float = 1e-3, seed: int = 0,
    target: str = "image", log_every: int = 0,
) -> dict:  # fmt: skip
    """Train the tower and projector on the train split's `target` labels; report the val split's scores at the
    end, the first and last loss, and the wall seconds spent (learning curves count them)."""
    if steps <= 0:
        raise ValueError(f"vision pretraining needs a positive number of steps, got {steps}")
    if target not in TARGETS:
        raise ValueError(f"vision pretraining target must be one of {sorted(TARGETS)}, got {target!r}")
    start = time.perf_counter()
    grid = task_grid(model, image_processor, dataset_dir) if target != "image" else None
    train, val = (TARGETS[target](dataset_dir, split, model, grid) for split in ("train", "val"))
    rows = train_vision_features(
        model, image_processor, train, val, steps, batch_size, learning_rate, eval_every=steps, seed=seed,
        on_row=lambda row: logger.info("vision pretraining: %s", row), log_every=log_every,
    )  # fmt: skip
    scores = {key: value for key, value in rows[-1].items() if key.startswith("val_")}
    return {
        "target": target, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
        "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"], **scores, "seconds": time.perf_counter() - start,
    }  # fmt: skip


def discriminant_projection(tokens: torch.Tensor, labels: torch.Tensor, k: int, shrinkage: float = 1e-3):
    """`(mean, projection, ratios)` of tokens `[N, width]` with class `labels` `[N]`: the `k` directions (rows of
    `projection`) that best separate the classes (Fisher's), scaled so the within-class covariance, plus `shrinkage`
    times its mean variance on the diagonal, is the identity along them; `ratios` are their between/within variance
    ratios, in the rows' order (smallest first). Computed in float64 on the CPU."""
    tokens, labels = tokens.detach().cpu().double(), labels.cpu()
    classes = labels.unique()
    width = tokens.shape[1]
    if not 0 < k <= min(len(classes) - 1, width):
        raise ValueError(
            f"k must be between 1 and min(classes - 1, width) = {min(len(classes) - 1, width)} for these tokens, got {k}"
        )
    mean = tokens.mean(0)
    within = torch.zeros(width, width, dtype=tokens.dtype)
    centres, weights = [], []
    for label in classes:
        members = tokens[labels == label]
        centre = members.mean(0)
        within += (members - centre).T @ (members - centre)
        centres.append(centre - mean)
        weights.append(len(members) / len(tokens))
    within = within / len(tokens)
    within += shrinkage * within.trace() / width * torch.eye(width, dtype=tokens.dtype)
    centres = torch.stack(centres)
    between = (centres.T * torch.tensor(weights, dtype=tokens.dtype)) @ centres
    whiten = torch.linalg.inv(torch.linalg.cholesky(within))
    ratios, vectors = torch.linalg.eigh(whiten @ between @ whiten.T)
    return mean, (whiten.T @ vectors[:, -k:]).T, ratios[-k:]


def token_output_layer(model) -> nn.Linear:
    """The last linear layer that writes the image tokens the language model reads: the projector's (CLIP's, or a
    composed VLM's projector or connector), or a Qwen-VL tower's merger's (not its DeepStack mergers')."""
    last = vision_parts(model)[-1]
    owner = getattr(last, "merger", None) or last
    layers = [module for module in owner.modules() if isinstance(module, nn.Linear)]
    if not layers or layers[-1].bias is None:
        raise ValueError(f"{type(owner).__name__} has no linear layer with a bias writing the image tokens to re-base")
    return layers[-1]


def rebase_on_discriminants(
    model, image_processor, dataset_dir, k: int, max_images: int = 2048, centred_norm: float = 12.0,
    mean_norm: float = 17.0, shrinkage: float = 1e-3, seed: int = 7,
) -> dict:  # fmt: skip
    """Fold into the token output layer a map onto the tokens' `k` most discriminant directions for the patch labels
    of the first `max_images` train images (`discriminant_projection`), laid along random orthonormal directions
    (drawn from `seed`), plus a mean along its own direction. A language model reads image tokens through random
    projections, so what tells the pairs apart must carry most of each token's variance; a tower trained by the
    stage keeps much of its random draw's instead (BENCHMARKS.md section 8). The default norms are the bundled CLIP
    + projector tokens' mean and centred norms. Returns the ratios, the images used and the seconds spent."""
    start = time.perf_counter()
    train = PatchContentLabels(dataset_dir, "train", task_grid(model, image_processor, dataset_dir))
    count = min(max_images, len(train))
    logger.info("re-basing the image tokens on %d of the %d train images", count, len(train))
    reference = next(vision_parts(model)[0].parameters())
    with torch.no_grad():
        tokens = torch.cat([
            image_features(model, image_processor, train.images[i : min(i + 64, count)], reference)
            for i in range(0, count, 64)
        ]).flatten(0, 1).cpu().double()  # fmt: skip
    if k >= tokens.shape[1]:
        raise ValueError(f"k must be below the tokens' width {tokens.shape[1]} (one direction holds their mean), got {k}")
    mean, projection, ratios = discriminant_projection(tokens, train.targets[:count].flatten(), k, shrinkage)
    scale = centred_norm / ((tokens - mean) @ projection.T).norm(dim=1).mean()
    directions = torch.randn(tokens.shape[1], k + 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    directions[:, 0] = mean
    directions = torch.linalg.qr(directions)[0]
    new_mean = directions[:, 0] * torch.sign(directions[:, 0] @ mean) * mean_norm
    rebase = scale * directions[:, 1:] @ projection
    layer = token_output_layer(model)
    with torch.no_grad():
        weight, bias = layer.weight.cpu().double(), layer.bias.cpu().double()
        layer.weight.copy_(rebase @ weight)
        layer.bias.copy_(rebase @ (bias - mean) + new_mean)
    return {"k": k, "images": count, "ratios": ratios.tolist(), "seconds": time.perf_counter() - start}


__all__ = [
    "ImageAndPatchLabels",
    "ImageContentLabels",
    "PatchContentLabels",
    "TARGETS",
    "discriminant_projection",
    "image_features",
    "patch_grid",
    "pretrain_vision",
    "rebase_on_discriminants",
    "task_grid",
    "token_output_layer",
    "train_vision_features",
    "vision_parts",
]
