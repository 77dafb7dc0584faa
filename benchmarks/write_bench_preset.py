"""Write a trainable folder (config + processor) for a preset that ships no tokenizer, e.g. configs/gsva-7b.

train_hf.py needs a processor beside the config; the large presets have none because their real tokenizer cannot be
downloaded here. This writes the benchmarks' stand-in (the tiny vocabulary padded so that the GSVA tokens get the
preset's ids, image processors sized like the preset), so train_hf.py runs GSVA-7B shapes with random weights:

    python benchmarks/write_bench_preset.py configs/gsva-7b /tmp/gsva-7b-bench
    torchrun --nproc_per_node 1 train_hf.py --model_name_or_path /tmp/gsva-7b-bench --deepspeed configs/deepspeed_zero2.json ...
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import preset_processor  # noqa: E402
from configuration_gsva import GSVAConfig  # noqa: E402


def write_bench_preset(preset: Path, out_dir: Path) -> Path:
    config = GSVAConfig.from_pretrained(preset)
    processor = preset_processor(preset, config)
    processor.check_config(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", type=Path, help="a preset folder with config.json and processor_settings.json")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    print(write_bench_preset(args.preset, args.out_dir))


if __name__ == "__main__":
    main()
