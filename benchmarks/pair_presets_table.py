"""Print a Markdown table of every VLM x SAM-family pair preset: parameters per part, bf16 weights, training
activation memory (vision tower and SAM image encoder frozen / everything trainable) and the prompt's KV cache.

    python benchmarks/pair_presets_table.py

Everything is computed on the meta device (no weights, no download); see `gsva_hf/pair_presets.py` for what the
training forward contains.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gsva_hf.pair_presets import ANSWER_TOKENS, PAIR_PRESETS, PROMPT_TEXT_TOKENS, SEG_TOKENS, pair_counts  # noqa: E402

COLUMNS = (
    "pair", "VLM vision (M)", "VLM language (M)", "mask image encoder (M)", "mask decoder + prompt enc. (M)",
    "GSVA head (M)", "total (M)", "bf16 weights (GB)", "activations frozen (GB)", "activations trainable (GB)",
    "prompt tokens", "KV cache (MB)",
)  # fmt: skip


def _gb(value) -> str:
    return "n/a" if value is None else f"{value / 1e9:.2f}"


def table_rows() -> tuple[list[str], list[str]]:
    rows, notes = [], []
    for name in PAIR_PRESETS:
        c = pair_counts(name)
        millions = [f"{c[key] / 1e6:.1f}" for key in ("vlm_vision", "vlm_language", "mask_image_encoder")]
        millions += [f"{c['mask_decoder'] / 1e6:.2f}", f"{c['gsva_head'] / 1e6:.2f}", f"{c['total'] / 1e6:.1f}"]
        cells = [name] + millions + [_gb(c["bf16_weight_bytes"]), _gb(c["activation_bytes_frozen"])]
        cells += [_gb(c["activation_bytes_trainable"]), str(c["prompt_tokens"]), f"{c['kv_cache_bytes'] / 1e6:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
        notes += [f"- {name}: {note}" for note in c["notes"]]
    return rows, notes


def main() -> None:
    rows, notes = table_rows()
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join(" --- " for _ in COLUMNS) + "|")
    print("\n".join(rows))
    print(
        f"\nBatch 1, bf16, sdpa; training forward: one image, {PROMPT_TEXT_TOKENS} prompt tokens, a {ANSWER_TOKENS}-token"
        f" answer with {SEG_TOKENS} [SEG], LM loss + BCE/Dice on 256x256 masks. Activations = bytes autograd saves"
        " (parameters excluded). KV cache = prompt tokens (text + image), bf16. GB = 1e9 bytes, MB = 1e6."
    )
    if notes:
        print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
