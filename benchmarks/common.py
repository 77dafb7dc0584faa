"""Shared timing helpers for the benchmarks: wall time, images/s and peak resident memory."""

import threading
import time

import psutil
import torch


class PeakMemory:
    """Peak RSS of this process (CPU) or peak allocated CUDA memory during a block, in MiB."""

    def __init__(self, device: str = "cpu", interval: float = 0.002):
        self.device, self.interval, self.peak_mib = device, interval, 0.0
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            return self
        process = psutil.Process()

        def sample():
            while not self._stop.is_set():
                self.peak_mib = max(self.peak_mib, process.memory_info().rss / 2**20)
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
        return False


def timed(function, repeats: int, device: str = "cpu") -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def preset_processor(preset_dir, config):
    """The preset's own processor; for large presets (which ship no tokenizer) the tiny tokenizer padded with
    unused tokens so that `[SEG]`, `[REJ]`, `<im_start>`, `<im_end>` and the image token get the preset's ids,
    with image processors sized like the preset. Benchmarks only: the text is the tiny vocabulary."""
    import json
    from pathlib import Path

    from gsva_hf.presets import build_tiny_tokenizer, image_processors
    from processing_gsva import IM_END_TOKEN, IM_START_TOKEN, REJ_TOKEN, SEG_TOKEN, GSVAProcessor

    preset_dir = Path(preset_dir)
    if (preset_dir / "tokenizer.json").is_file():
        return GSVAProcessor.from_pretrained(preset_dir)
    settings = json.loads((preset_dir / "processor_settings.json").read_text())
    tokenizer = build_tiny_tokenizer(gsva_tokens=False)
    tokenizer.pad_token = tokenizer.unk_token
    wanted = {
        config.seg_token_id: SEG_TOKEN,
        config.rej_token_id: REJ_TOKEN,
        config.im_start_token_id: IM_START_TOKEN,
        config.im_end_token_id: IM_END_TOKEN,
        config.image_token_id: settings["image_token"],
    }
    filler = [f"<unused_{i}>" for i in range(len(tokenizer), min(wanted))]
    tokenizer.add_tokens(filler, special_tokens=True)
    tokenizer.add_special_tokens({"additional_special_tokens": [wanted[i] for i in sorted(wanted)]})
    clip, sam = image_processors(config.vision_config.image_size, config.sam_config.vision_config.image_size)
    processor = GSVAProcessor(
        clip, sam, tokenizer, conv_template=settings["conv_template"], image_token=settings["image_token"],
        num_image_tokens=config.num_image_tokens,
    )  # fmt: skip
    processor.check_config(config)
    return processor
