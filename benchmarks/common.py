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
