"""GSVA: generalized referring segmentation with a multimodal LLM (CVPR 2024), transformers-native.

LLaVA (CLIP vision tower, projector, causal LM) reads the image and the question and answers with one `[SEG]`
per present target and `[REJ]` per absent one. The last-layer hidden state at the position just before each
`[SEG]` goes through `text_hidden_fcs` and becomes one sparse prompt of SAM's mask decoder.

Shipped with a Hub repository for ``trust_remote_code``: imports only torch, transformers and its sibling files.
"""

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

try:
    from .configuration_gsva import GSVAConfig
except ImportError:
    from configuration_gsva import GSVAConfig

IGNORE_INDEX = -100
AUTO_MAP = {
    "AutoConfig": "configuration_gsva.GSVAConfig",
    "AutoModel": "modeling_gsva.GSVAForCausalLM",
    "AutoModelForCausalLM": "modeling_gsva.GSVAForCausalLM",
    "AutoProcessor": "processing_gsva.GSVAProcessor",
}
DICE_SCALE = 1000.0
DICE_EPS = 1e-6


@dataclass
class GSVAOutput(ModelOutput):
    """Output of `GSVAForCausalLM.forward`.

    loss: `ce_loss + mask_bce_loss + mask_dice_loss`, each already multiplied by its config weight.
    pred_masks: per row, mask logits `[num_targets, H, W]` at the original image size, one per `[SEG]`/`[REJ]`
        slot in text order. `[REJ]` slots hold zeros (no prediction), as in GSVA's training.
    target_is_seg: per row, a bool tensor telling which slots are `[SEG]` (True) or `[REJ]` (False).
    iou_scores: per row, SAM's predicted IoU for each slot (0 for `[REJ]` slots).
    """

    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    mask_bce_loss: torch.Tensor | None = None
    mask_dice_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    pred_masks: list[torch.Tensor] | None = None
    target_is_seg: list[torch.Tensor] | None = None
    iou_scores: list[torch.Tensor] | None = None


@dataclass
class GSVATeacherForcedOutput(ModelOutput):
    """Output of `GSVAForCausalLM.score_teacher_forced` (GSVA's evaluation protocol).

    predicted_rejected: per row, for each ground-truth `[SEG]`/`[REJ]` slot in text order, whether the model
        predicts `[REJ]` there (read from the logits one position earlier).
    pred_masks: per row, mask logits `[num_slots, H, W]` at the original size (every slot with `reeval`).
    gt_is_seg: per row, the ground-truth slot types.
    """

    predicted_rejected: list[torch.Tensor] | None = None
    pred_masks: list[torch.Tensor] | None = None
    gt_is_seg: list[torch.Tensor] | None = None


@dataclass
class SegmentedTarget:
    """One `[SEG]`/`[REJ]` slot of a generated answer.

    mask: bool `[H, W]` at the original image size (all False when rejected).
    score: probability the model gave its own choice (`[SEG]` or `[REJ]`) at this slot.
    mask_score: mean foreground probability inside the mask (0 when rejected or empty).
    """

    phrase: str
    rejected: bool
    mask: torch.Tensor
    score: float
    mask_score: float


@dataclass
class SegmentationResult:
    """What `GSVAForCausalLM.segment` returns per image: the generated answer and one entry per target slot."""

    answer: str
    targets: list[SegmentedTarget]


class GSVAMultiModalProjector(nn.Module):
    """LLaVA v1 `linear` projector, or LLaVA-1.5 `mlp2x_gelu` (same parameter names as transformers' Llava)."""

    def __init__(self, config: GSVAConfig):
        super().__init__()
        vision_width = config.vision_config.hidden_size
        text_width = config.text_config.hidden_size
        self.linear_1 = nn.Linear(vision_width, text_width)
        if config.projector_type == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(text_width, text_width)
        else:
            self.act = None
            self.linear_2 = None

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(image_features)
        if self.linear_2 is not None:
            hidden = self.linear_2(self.act(hidden))
        return hidden


def build_text_hidden_fcs(text_width: int, out_dim: int) -> nn.ModuleList:
    """`Linear(d,d) - ReLU - Linear(d,out) - Dropout(0)`, laid out as GSVA's `text_hidden_fcs.0.{0,2}`."""
    return nn.ModuleList(
        [nn.Sequential(nn.Linear(text_width, text_width), nn.ReLU(), nn.Linear(text_width, out_dim), nn.Dropout(0.0))]
    )


def mask_bce_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over masks of the per-mask mean binary cross-entropy (GSVA's `sigmoid_ce_loss` times the mask count)."""
    if pred.shape[0] == 0:
        return pred.sum()
    per_pixel = F.binary_cross_entropy_with_logits(pred.float(), target.float(), reduction="none")
    return per_pixel.flatten(1).mean(1).sum()


def mask_dice_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over masks of GSVA's Dice loss (inputs scaled by 1/1000, eps 1e-6)."""
    if pred.shape[0] == 0:
        return pred.sum()
    prob = pred.float().sigmoid().flatten(1) / DICE_SCALE
    gt = target.float().flatten(1)
    numerator = 2 * (prob * gt).sum(-1)
    denominator = prob.sum(-1) + (gt / DICE_SCALE).sum(-1)
    return (1 - (numerator + DICE_EPS) / (denominator + DICE_EPS)).sum()


class GSVAPreTrainedModel(PreTrainedModel):
    config: GSVAConfig
    config_class = GSVAConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class GSVAForCausalLM(GSVAPreTrainedModel, GenerationMixin):
    """LLaVA + SAM with `[SEG]`/`[REJ]` tokens; see the module docstring."""

    # The Trainer must not pass `num_items_in_batch`: GSVA's CE is a mean over the batch's answer tokens.
    accepts_loss_kwargs = False

    def __init__(self, config: GSVAConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = GSVAMultiModalProjector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.sam = AutoModel.from_config(config.sam_config)
        self.text_hidden_fcs = build_text_hidden_fcs(config.text_config.hidden_size, config.out_dim)
        # device_map="auto" must not split the blocks of whichever sub-models the config chose.
        self._no_split_modules = sorted(
            {name for part in (self.vision_tower, self.language_model, self.sam) for name in part._no_split_modules or []}
        )
        self.post_init()
        self._init_like_original()

    def _init_like_original(self):
        """SAM and `text_hidden_fcs` start as in GSVA: PyTorch's default layer init (segment-anything's modules,
        Fourier features with std 1) instead of transformers' normal(0.02) and std hidden/2, which trains the mask
        path of a from-scratch model much more slowly. Loaded checkpoints overwrite all of it."""
        if self.text_hidden_fcs[0][0].weight.device.type == "meta":
            return
        with torch.no_grad():
            for module in list(self.sam.modules()) + list(self.text_hidden_fcs.modules()):
                if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding, nn.LayerNorm)):
                    module.reset_parameters()
            self.sam.shared_image_embedding.positional_embedding.normal_(0.0, 1.0)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Write an `auto_map` naming this class for AutoModel too, so both Auto classes load the folder."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    # ----------------------------------------------------------------- embeddings (needed by resize, peft, generate)
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module):
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.base_model

    # ----------------------------------------------------------------- vision
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP hidden states at `vision_feature_layer` (CLS dropped for "default"), projected to the LM width."""
        outputs = self.vision_tower(pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
        features = outputs.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    def get_sam_image_embeddings(self, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        """SAM image-encoder embeddings `[B, 256, 64, 64]`; under `no_grad` unless the encoder is trained."""
        encoder = self.sam.vision_encoder
        pixel_values = sam_pixel_values.to(encoder.dtype)
        if self.config.train_sam_vision_encoder:
            return encoder(pixel_values).last_hidden_state
        with torch.no_grad():
            return encoder(pixel_values).last_hidden_state

    def embed_inputs(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with each image placeholder run replaced by that row's visual tokens."""
        image_mask = input_ids == self.config.image_token_id
        embeddings = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        if pixel_values is None:
            if image_mask.any():
                raise ValueError("input_ids contain image tokens but no pixel_values were given")
            return embeddings
        features = self.get_image_features(pixel_values).to(embeddings.dtype)
        if image_mask.sum() != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"input_ids hold {int(image_mask.sum())} image tokens but pixel_values give "
                f"{features.shape[0]} images x {features.shape[1]} features; each row needs exactly "
                f"{self.config.num_image_tokens} image tokens and one image"
            )
        return embeddings.masked_scatter(image_mask.unsqueeze(-1), features)

    # ----------------------------------------------------------------- [SEG] -> masks
    def target_slots(self, input_ids: torch.LongTensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per row, the positions of `[SEG]`/`[REJ]` tokens in text order and whether each is `[SEG]`."""
        slots = []
        for row in input_ids:
            positions = torch.nonzero(
                (row == self.config.seg_token_id) | (row == self.config.rej_token_id), as_tuple=False
            ).flatten()
            slots.append((positions, row[positions] == self.config.seg_token_id))
        return slots

    def masks_from_hidden_states(
        self,
        seg_hidden_states: list[torch.Tensor],
        sam_image_embeddings: torch.Tensor,
        resized_sizes: torch.Tensor,
        original_sizes: torch.Tensor,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The one place where `[SEG]` hidden states become masks, for training, evaluation and inference.

        seg_hidden_states: per image, last-layer states `[n_i, d]` at the positions just before its `[SEG]`s.
        sam_image_embeddings: `[B, C, h, w]` from `get_sam_image_embeddings`, one per image.
        resized_sizes / original_sizes: `[B, 2]` (height, width) after SAM's longest-side resize / of the image.
        Returns per image mask logits `[n_i, H_i, W_i]` (float32) and SAM's IoU predictions `[n_i]`.
        """
        decoder = self.sam.mask_decoder
        sam_size = self.config.sam_config.vision_config.image_size
        dtype = decoder.iou_token.weight.dtype
        counts = [int(states.shape[0]) for states in seg_hidden_states]
        total = sum(counts)
        if total == 0:
            zeros = sam_image_embeddings.new_zeros
            masks = [zeros((0, int(h), int(w)), dtype=torch.float32) for h, w in original_sizes.tolist()]
            return masks, [zeros((0,), dtype=torch.float32) for _ in counts]
        # All targets of the batch go through the decoder in one call: row t sees its own image's embedding.
        states = torch.cat(seg_hidden_states, dim=0)
        prompts = self.text_hidden_fcs[0](states.to(next(self.text_hidden_fcs.parameters()).dtype)).to(dtype)
        device = sam_image_embeddings.device
        owner = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
        image_embeddings = sam_image_embeddings.to(dtype).index_select(0, owner)
        positional = self.sam.get_image_wide_positional_embeddings().to(dtype).expand(total, -1, -1, -1)
        no_mask = self.sam.prompt_encoder.no_mask_embed.weight.to(dtype).reshape(1, -1, 1, 1)
        low_res, iou = decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=prompts[:, None, None, :],
            dense_prompt_embeddings=no_mask.expand_as(image_embeddings),
            multimask_output=False,
        )
        low_res, iou = low_res[:, 0, 0], iou[:, 0, 0].float()
        # Post-process images that share (resized, original) sizes together: one interpolation per size pair.
        sizes = [tuple(resized) + tuple(original) for resized, original in zip(resized_sizes.tolist(), original_sizes.tolist())]
        starts = [0, *itertools.accumulate(counts)]
        masks: list[torch.Tensor | None] = [None] * len(counts)
        for key in dict.fromkeys(sizes):
            members = [i for i, size in enumerate(sizes) if size == key]
            rows = torch.cat([torch.arange(starts[i], starts[i] + counts[i]) for i in members]).to(low_res.device)
            upsampled = self.postprocess_masks(low_res.index_select(0, rows), key[:2], key[2:], sam_size)
            for i, part in zip(members, upsampled.split([counts[i] for i in members])):
                masks[i] = part
        return masks, list(iou.split(counts))

    @staticmethod
    def postprocess_masks(low_res: torch.Tensor, resized_size, original_size, sam_size: int) -> torch.Tensor:
        """SAM's post-processing: upsample to the padded input, crop the resized image, resize to the original.

        Only the low-resolution rows and columns that the crop keeps are upsampled. With an integer ratio r,
        bilinear upsampling (align_corners=False) reads output pixel i from input position (i + 0.5) / r - 0.5
        whatever the input's extent, so upsampling the slice by r gives the full result's numbers on the crop.
        """
        height, width = int(resized_size[0]), int(resized_size[1])
        logits = low_res[:, None].float()
        ratio = sam_size // logits.shape[-1]
        if ratio * logits.shape[-1] == sam_size and logits.shape[-2] == logits.shape[-1]:
            # Output row i < height interpolates input rows floor((i + 0.5) / r - 0.5) and the next: < ceil(h / r) + 1.
            rows, cols = (min(logits.shape[-1], -(-size // ratio) + 1) for size in (height, width))
            logits = F.interpolate(logits[..., :rows, :cols], scale_factor=ratio, mode="bilinear", align_corners=False)
        else:
            logits = F.interpolate(logits, (sam_size, sam_size), mode="bilinear", align_corners=False)
        logits = logits[..., :height, :width]
        original = tuple(int(v) for v in original_size)
        if original != (height, width):
            logits = F.interpolate(logits, original, mode="bilinear", align_corners=False)
        return logits[:, 0]

    def gather_seg_hidden_states(
        self, last_hidden_state: torch.Tensor, input_ids: torch.LongTensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per row, the states that predict each `[SEG]` (position - 1) and the row's slot flags."""
        states, flags = [], []
        for row, (positions, is_seg) in enumerate(self.target_slots(input_ids)):
            seg_positions = positions[is_seg]
            if (seg_positions == 0).any():
                raise ValueError(f"row {row}: a [SEG] token at position 0 has no preceding state")
            states.append(last_hidden_state[row, seg_positions - 1])
            flags.append(is_seg)
        return states, flags

    def scatter_to_slots(self, seg_values: list[torch.Tensor], flags: list[torch.Tensor]) -> list[torch.Tensor]:
        """Place per-`[SEG]` values at their slots; `[REJ]` slots get zeros, as in GSVA."""
        out = []
        for values, is_seg in zip(seg_values, flags):
            full = values.new_zeros((is_seg.shape[0],) + tuple(values.shape[1:]))
            full[is_seg.to(values.device)] = values
            out.append(full)
        return out

    # ----------------------------------------------------------------- losses
    def ce_loss(self, logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
        """Shifted next-token CE, mean over answer tokens; `[SEG]`/`[REJ]` targets weighted by `seg_rej_ce_weight`."""
        shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
        per_token = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
        valid = shift_labels != IGNORE_INDEX
        weight = valid.float()
        if self.config.seg_rej_ce_weight != 1.0:
            is_target = (shift_labels == self.config.seg_token_id) | (shift_labels == self.config.rej_token_id)
            weight = torch.where(is_target & valid, weight * self.config.seg_rej_ce_weight, weight)
        return (per_token * weight).sum() / weight.sum().clamp_min(1e-8)

    def mask_losses(
        self, pred_masks: list[torch.Tensor], gt_masks: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted BCE and Dice over all targets of the batch, normalised by the target count incl. `[REJ]`."""
        num_targets = 0
        bce = dice = pred_masks[0].new_zeros(())
        for row, (pred, gt) in enumerate(zip(pred_masks, gt_masks)):
            if pred.shape != gt.shape:
                raise ValueError(
                    f"row {row}: the answer has {pred.shape[0]} [SEG]/[REJ] slots of size {tuple(pred.shape[1:])} "
                    f"but gt_masks[{row}] has shape {tuple(gt.shape)}; give one mask per slot at the original size"
                )
            gt = gt.to(pred.device)
            bce = bce + mask_bce_loss(pred, gt)
            dice = dice + mask_dice_loss(pred, gt)
            num_targets += gt.shape[0]
        denominator = num_targets + 1e-8
        return self.config.bce_loss_weight * bce / denominator, self.config.dice_loss_weight * dice / denominator

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        sam_pixel_values: torch.Tensor | None = None,
        sam_image_embeddings: torch.Tensor | None = None,
        original_sizes: torch.Tensor | None = None,
        resized_sizes: torch.Tensor | None = None,
        gt_masks: list[torch.Tensor] | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> GSVAOutput:
        r"""
        input_ids: text with each image expanded to `config.num_image_tokens` image tokens (see `GSVAProcessor`).
        pixel_values: CLIP input, one image per row that holds image tokens.
        sam_pixel_values / sam_image_embeddings: SAM input `[B, 3, 1024, 1024]` or its encoder output. When given
            (with `original_sizes` and `resized_sizes`), masks are predicted for every `[SEG]` in `input_ids`.
        gt_masks: per row, `[num_slots, H, W]` ground truth at the original size, one per `[SEG]`/`[REJ]` slot;
            with `labels` it adds the BCE and Dice losses.
        """
        kwargs.pop("num_items_in_batch", None)
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids or inputs_embeds")
            inputs_embeds = self.embed_inputs(input_ids, pixel_values)
        wants_masks = sam_pixel_values is not None or sam_image_embeddings is not None
        decoder_outputs = self.get_decoder()(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            **kwargs,
        )
        last_hidden_state = decoder_outputs.last_hidden_state
        if logits_to_keep and labels is None:
            logits = self.get_output_embeddings()(last_hidden_state[:, -logits_to_keep:])
        else:
            logits = self.get_output_embeddings()(last_hidden_state)

        pred_masks = target_is_seg = iou_scores = None
        if wants_masks:
            if input_ids is None:
                raise ValueError("mask prediction needs input_ids to find the [SEG] tokens")
            if original_sizes is None or resized_sizes is None:
                raise ValueError("mask prediction needs original_sizes and resized_sizes (from GSVAProcessor)")
            if sam_image_embeddings is None:
                sam_image_embeddings = self.get_sam_image_embeddings(sam_pixel_values)
            seg_states, target_is_seg = self.gather_seg_hidden_states(last_hidden_state, input_ids)
            seg_masks, seg_scores = self.masks_from_hidden_states(
                seg_states, sam_image_embeddings, resized_sizes, original_sizes
            )
            pred_masks = self.scatter_to_slots(seg_masks, target_is_seg)
            iou_scores = self.scatter_to_slots(seg_scores, target_is_seg)

        loss = ce = bce = dice = None
        if labels is not None:
            ce = self.config.ce_loss_weight * self.ce_loss(logits, labels)
            loss = ce
            if gt_masks is not None:
                if pred_masks is None:
                    raise ValueError("gt_masks need sam_pixel_values (or sam_image_embeddings) to predict masks")
                bce, dice = self.mask_losses(pred_masks, gt_masks)
                loss = ce + bce + dice

        return GSVAOutput(
            loss=loss,
            ce_loss=ce,
            mask_bce_loss=bce,
            mask_dice_loss=dice,
            logits=logits,
            cache=decoder_outputs.cache if use_cache is not False else None,
            hidden_states=decoder_outputs.hidden_states,
            attentions=decoder_outputs.attentions,
            pred_masks=pred_masks,
            target_is_seg=target_is_seg,
            iou_scores=iou_scores,
        )

    # ----------------------------------------------------------------- evaluation and inference
    @torch.no_grad()
    def score_teacher_forced(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor,
        sam_pixel_values: torch.Tensor,
        original_sizes: torch.Tensor,
        resized_sizes: torch.Tensor,
        reeval: bool = True,
        **unused,
    ) -> GSVATeacherForcedOutput:
        """GSVA's evaluation forward over ground-truth conversations.

        At each ground-truth `[SEG]`/`[REJ]` slot the decision is the argmax one position earlier: a `[SEG]` slot
        counts as kept only if `[SEG]` is predicted, a `[REJ]` slot as rejected only if `[REJ]` is predicted.
        With `reeval` every `[REJ]` is rewritten to `[SEG]` and the model runs again so every slot gets a mask.

        Same numbers as two full passes with less work: one pass up to the last slot gives the decisions (LM head
        at the slots only) and every state before its first `[REJ]`; the rows with a slot after their first `[REJ]`
        rerun from the earliest such `[REJ]` on, on the first pass's KV cache of the shared prefix; SAM's mask
        decoder runs once for all slots.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        slots = self.target_slots(input_ids)
        for row, (positions, _) in enumerate(slots):
            if positions.numel() and int(positions[0]) == 0:
                raise ValueError(f"row {row}: a [SEG]/[REJ] token at position 0 has no preceding state")
        masked = [positions if reeval else positions[is_seg] for positions, is_seg in slots]
        # A row's states before its first [REJ] are the same in both passes: only rows with a slot after it rerun,
        # from the earliest such first [REJ] on.
        first_rej = {
            row: int(positions[~is_seg][0]) for row, (positions, is_seg) in enumerate(slots) if reeval and not is_seg.all()
        }
        redo = [row for row, position in first_rej.items() if int(slots[row][0][-1]) > position]
        end = max((int(positions[-1]) for positions, _ in slots if positions.numel()), default=1)
        embeddings = self.embed_inputs(input_ids, pixel_values)[:, :end]
        decoder = self.get_decoder()
        first = decoder(
            inputs_embeds=embeddings, attention_mask=attention_mask[:, :end], use_cache=bool(redo), return_dict=True
        )
        states = first.last_hidden_state

        decided = self._states_before(states, [positions for positions, _ in slots])
        predictions = self.get_output_embeddings()(decided).argmax(-1).split([len(p) for p, _ in slots])
        rejected, gt_is_seg = [], []
        for predicted, (_, is_seg) in zip(predictions, slots):
            rejected.append(torch.where(is_seg, predicted != self.config.seg_token_id, predicted == self.config.rej_token_id))
            gt_is_seg.append(is_seg)

        mask_states = list(self._states_before(states, masked).split([len(p) for p in masked]))
        if redo:
            start = min(first_rej[row] for row in redo)
            rerun = self._rerun_from(start, first.cache, embeddings, input_ids, attention_mask, redo)
            for k, row in enumerate(redo):
                before = masked[row].to(states.device) - 1
                late = before >= start
                mask_states[row][late] = rerun[k, before[late] - start]
        del first
        sam_embeddings = self.get_sam_image_embeddings(sam_pixel_values)
        masks, _ = self.masks_from_hidden_states(mask_states, sam_embeddings, resized_sizes, original_sizes)
        if not reeval:
            masks = self.scatter_to_slots(masks, gt_is_seg)
        return GSVATeacherForcedOutput(predicted_rejected=rejected, pred_masks=masks, gt_is_seg=gt_is_seg)

    @staticmethod
    def _states_before(states: torch.Tensor, positions: list[torch.Tensor]) -> torch.Tensor:
        """The states one position before each given token, all rows' in one `[sum n_i, d]` tensor."""
        counts = torch.tensor([len(p) for p in positions], device=states.device, dtype=torch.long)
        rows = torch.repeat_interleave(torch.arange(len(positions), device=states.device), counts)
        flat = torch.cat(positions).to(states.device) if positions else counts
        return states[rows, flat - 1]

    def _rerun_from(self, start: int, cache, embeddings, input_ids, attention_mask, redo: list[int]) -> torch.Tensor:
        """Last-layer states `[len(redo), end - start, d]` of the rows `redo` from `start` on, every `[REJ]` read
        as `[SEG]`, on the first pass's cache cropped to `start` (positions are token indices, as in a full pass)."""
        end = embeddings.shape[1]
        index = torch.tensor(redo, device=embeddings.device)
        cache.crop(start - end)
        if len(redo) < embeddings.shape[0]:
            cache.batch_select_indices(index)
        tail_ids = input_ids[index, start:end]
        seg = self.get_input_embeddings()(tail_ids.new_full((1, 1), self.config.seg_token_id))
        tail = torch.where((tail_ids == self.config.rej_token_id)[..., None], seg, embeddings[index, start:end])
        rerun = self.get_decoder()(
            inputs_embeds=tail,
            attention_mask=attention_mask[index, :end],
            position_ids=torch.arange(start, end, device=tail.device)[None],
            cache=cache,
            use_cache=True,
            return_dict=True,
        )
        return rerun.last_hidden_state

    @torch.no_grad()
    def segment(
        self,
        processor,
        images,
        text: str | list[str] | None = None,
        targets: list[str] | list[list[str]] | None = None,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        threshold: float = 0.0,
        batch_size: int = 8,
        **generate_kwargs,
    ) -> list[SegmentationResult]:
        """Image(s) + a question or target phrases in, per image the answer and one mask per target out.

        text: a question per image, used as typed (e.g. "What are the man on the left and the red car in this
            image?"). targets: instead, phrases per image; the question is GSVA's multi-target template.
        The answer is generated (KV cache, greedy by default, left-padded batches); the `[SEG]` states are the
        generated sequence's last-layer states just before each `[SEG]`; SAM's image encoder runs once per image
        and the mask decoder once after generation. Rejected targets get an all-False mask.
        """
        questions, given_phrases = self._segment_questions(processor, images, text, targets)
        image_list = images if isinstance(images, (list, tuple)) else [images]
        results: list[SegmentationResult] = []
        for start in range(0, len(image_list), batch_size):
            chunk = slice(start, start + batch_size)
            batch = processor(images=list(image_list[chunk]), text=questions[chunk]).to(self.device)
            results += self._segment_batch(
                processor, batch, given_phrases[chunk], max_new_tokens, do_sample, threshold, generate_kwargs
            )
        return results

    @staticmethod
    def _segment_questions(processor, images, text, targets) -> tuple[list[str], list[list[str] | None]]:
        count = len(images) if isinstance(images, (list, tuple)) else 1
        if (text is None) == (targets is None):
            raise ValueError("segment() takes either `text` (a question per image) or `targets` (phrases per image)")
        if text is not None:
            questions = [text] * count if isinstance(text, str) else list(text)
            if len(questions) != count:
                raise ValueError(f"got {count} images but {len(questions)} texts")
            return questions, [None] * count
        per_image = [targets] if targets and isinstance(targets[0], str) else list(targets)
        if len(per_image) == 1 and count > 1:
            per_image = per_image * count
        if len(per_image) != count:
            raise ValueError(f"got {count} images but {len(per_image)} target lists")
        return [processor.targets_question(phrases) for phrases in per_image], per_image

    def _segment_batch(self, processor, batch, given_phrases, max_new_tokens, do_sample, threshold, generate_kwargs):
        special = [self.config.image_token_id, self.config.im_start_token_id, self.config.im_end_token_id]
        generated = self.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            output_hidden_states=True,
            output_logits=True,
            return_dict_in_generate=True,
            suppress_tokens=special,
            **generate_kwargs,
        )
        sequences = generated.sequences
        prompt_length = batch["input_ids"].shape[1]
        states = torch.cat([step[-1] for step in generated.hidden_states], dim=1)
        answer_ids = sequences[:, prompt_length:]
        eos = self.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        answers = []
        for row in answer_ids:
            ends = [i for i, t in enumerate(row.tolist()) if t in eos_ids]
            answers.append(row[: ends[0]] if ends else row)
        seg_states, flags, slot_scores = [], [], []
        for row, answer in enumerate(answers):
            slot_offsets = torch.nonzero(
                (answer == self.config.seg_token_id) | (answer == self.config.rej_token_id)
            ).flatten()
            is_seg = answer[slot_offsets] == self.config.seg_token_id
            seg_states.append(states[row, prompt_length + slot_offsets[is_seg] - 1])
            flags.append(is_seg)
            probabilities = [
                generated.logits[int(step)][row].float().softmax(-1)[int(answer[int(step)])].item() for step in slot_offsets
            ]
            slot_scores.append(probabilities)
        sam_embeddings = self.get_sam_image_embeddings(batch["sam_pixel_values"])
        masks, _ = self.masks_from_hidden_states(seg_states, sam_embeddings, batch["resized_sizes"], batch["original_sizes"])
        results = []
        for row in range(sequences.shape[0]):
            answer_text = processor.decode_answer(answers[row].tolist())
            phrases = processor.answer_phrases(answer_text)
            if given_phrases[row] is not None and len(given_phrases[row]) == len(flags[row]):
                phrases = list(given_phrases[row])
            height, width = (int(v) for v in batch["original_sizes"][row])
            seg_masks = iter(masks[row])
            targets = []
            for slot, is_seg in enumerate(flags[row].tolist()):
                if is_seg:
                    logits = next(seg_masks)
                    mask = (logits > threshold).cpu()
                    inside = logits.sigmoid()[mask.to(logits.device)]
                    mask_score = float(inside.mean()) if inside.numel() else 0.0
                else:
                    mask, mask_score = torch.zeros((height, width), dtype=torch.bool), 0.0
                phrase = phrases[slot] if slot < len(phrases) else ""
                targets.append(SegmentedTarget(phrase, not is_seg, mask, slot_scores[row][slot], mask_score))
            results.append(SegmentationResult(answer=answer_text, targets=targets))
        return results


GSVAForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["GSVAForCausalLM", "GSVAPreTrainedModel", "GSVAOutput"]
