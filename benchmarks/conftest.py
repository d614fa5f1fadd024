"""Shared benchmark helpers: time a baseline in the same run, and print one table per benchmark file.

The ``bench`` fixture (a :class:`Bench`) gives:

* ``bench.measure(fn, device=..., graph=False)``: median seconds of a call (CUDA
  events on a GPU, ``perf_counter`` on the CPU; ``graph=True`` times CUDA-graph
  replays, without launch overhead), so a benchmark can report a ratio against a
  baseline timed in the same run, on the same device;
* ``bench.add(title, **columns)``: a row of a table printed at the end of the run
  (and appended to the file ``REWARDFL_BENCH_TABLE`` names, when set);
* ``bench.timing(benchmark)``: False under ``--benchmark-disable`` (CI runs the
  benchmarks once, as tests): run each variant once and compare results, no timing;
* ``bench.device_name(device)``: the device a figure was measured on.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import pytest
import torch


def device_name(device: torch.device | str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` or ``"CPU (2 threads)"``: the device a figure was measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads != 1 else ''})"


def timing(benchmark) -> bool:
    """True unless pytest-benchmark is disabled (``--benchmark-disable``)."""
    return not benchmark.disabled


def measure(fn: Callable[[], object], *, device: torch.device | str, reps: int = 20, warmup: int = 3,
            graph: bool = False) -> float:
    """Median seconds of one ``fn()`` call on ``device``.

    On a GPU the time runs from an event before the call to one after it, so it
    includes launch overhead whenever the CPU is the slower side. ``graph=True``
    captures ``fn`` in a CUDA graph once and times its replays: the device time
    alone, for bandwidth figures (PyTorch's whole-network capture recipe: warm-up
    on a side stream, then capture; forward and backward may both be in ``fn``).
    """
    device = torch.device(device)
    if graph:
        if device.type != "cuda":
            raise ValueError("measure(graph=True) needs a CUDA device")
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            fn()
        fn = cuda_graph.replay
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Bench:
    """Timing helpers and rows of named columns, grouped by title, printed at the end of the session."""

    device_name = staticmethod(device_name)
    timing = staticmethod(timing)
    measure = staticmethod(measure)

    def __init__(self):
        self.tables: dict[str, list[dict]] = {}

    def add(self, title: str, **columns) -> None:
        self.tables.setdefault(title, []).append(columns)

    def render(self) -> str:
        out = []
        for title, rows in self.tables.items():
            keys = list(dict.fromkeys(k for row in rows for k in row))
            cells = [[_fmt(row.get(k, "")) for k in keys] for row in rows]
            widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
            out.append(f"\n{title}")
            out.append("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
            out.extend("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells)
        return "\n".join(out)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


_TABLE = Bench()


@pytest.fixture(scope="session")
def bench() -> Bench:
    return _TABLE


def pytest_terminal_summary(terminalreporter):
    if _TABLE.tables:
        terminalreporter.write_sep("=", "benchmark tables (ratios against baselines timed in the same run)")
        terminalreporter.write_line(_TABLE.render())
        path = os.environ.get("REWARDFL_BENCH_TABLE")
        if path:  # e.g. to paste into benchmarks/RESULTS.md
            with open(path, "a", encoding="utf-8") as f:
                f.write(_TABLE.render() + "\n")
