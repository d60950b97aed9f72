"""Peak memory of a phase: CUDA allocator peak on a GPU, else resident set size sampled every 5 ms."""
from __future__ import annotations

import threading

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (timestamps must include it); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop = threading.Event()
            self.peak_mb = self.rss_mb()

            def sample():
                while not self._stop.wait(0.005):
                    self.peak_mb = max(self.peak_mb, self.rss_mb())
            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self.rss_mb())
