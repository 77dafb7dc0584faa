"""Checkpoint conversion to GSVA folders that `GSVAForCausalLM.from_pretrained` loads.

Sources:
1. a released GSVA / LISA checkpoint (DeepSpeed `zero_to_fp32` dump of the PEFT-wrapped original model, LoRA
   unmerged) plus the LLaVA base it was trained from (config and tokenizer);
2. bases for training from scratch: LLaVA v1 in its original layout or a transformers Llava folder, plus SAM as
   the official segment-anything `.pth` or a transformers `SamModel` folder, plus CLIP when LLaVA lacks it;
3. a random preset (`tiny`).

The original loader used `strict=False` and never looked at the result, so here every source tensor is mapped
or reported and every model tensor is provided or reported; the run fails unless the user names what to allow.
Tensors are read one at a time (torch files memory-mapped, safetensors on demand) into a model whose
parameters start on the meta device, so a conversion holds about one copy of the model.

By source: `sam` (segment-anything → SamModel), `llava` (LLaVA bases, CLIP, the original key maps), `lora` (PEFT
wrappers and unmerged LoRA), `release` (1.), `bases` (2. and 3.); `common` (errors, checkpoint files, the report)
and `assembly` (strict check, filling and saving the model) serve them all.
"""

from .assembly import build_processor
from .bases import convert_bases, write_random
from .common import DTYPES, ConversionError, ConversionReport, TensorStore
from .llava import base_tokenizer, clip_vision_config, load_llava_base
from .lora import unwrap_peft
from .release import convert_release, release_tokenizer
from .sam import convert_sam_state_dict, sam_config_from_shapes, sam_rename_plan

__all__ = [
    "ConversionError",
    "ConversionReport",
    "TensorStore",
    "sam_rename_plan",
    "convert_sam_state_dict",
    "sam_config_from_shapes",
    "unwrap_peft",
    "load_llava_base",
    "clip_vision_config",
    "release_tokenizer",
    "base_tokenizer",
    "build_processor",
    "convert_release",
    "convert_bases",
    "write_random",
    "DTYPES",
]
