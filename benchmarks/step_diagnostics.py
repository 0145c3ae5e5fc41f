"""What happens during timed training steps besides the model's arithmetic: GPU clocks, power and
temperature (sampled from nvidia-smi), and a torch.profiler look at a few steps (kernel time vs wall time).

Used by benchmarks/train_throughput.py to explain a step-time difference between two variants: equal kernel
times with more wall time point at the host (Python, launches, allocator); longer kernels at the same
clock point at the data; a lower SM clock points at power or temperature.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

FIELDS = ["clocks.sm", "power.draw", "temperature.gpu"]
REASONS = "clocks_event_reasons.active"  # why the clock is below its maximum (a bit mask), newer drivers only


class GpuSampler:
    """nvidia-smi every `interval_ms` in the background; each sample stamped with time.perf_counter()."""

    def __init__(self, interval_ms: int = 50):
        self.samples: list[tuple[float, dict]] = []
        self.process = None
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return
        fields = FIELDS + [REASONS]
        probe = subprocess.run([smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-i", "0"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            fields = FIELDS
        self.fields = fields
        self.process = subprocess.Popen(
            [smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-i", "0",
             f"-lms={interval_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.process.stdout:
            values = [v.strip() for v in line.split(",")]
            if len(values) == len(self.fields):
                self.samples.append((time.perf_counter(), dict(zip(self.fields, values, strict=True))))

    def stop(self):
        if self.process is not None:
            self.process.terminate()
            self.process.wait()

    def window(self, start: float, end: float) -> dict:
        """Medians (clock, power), maximum (temperature) and the clock-event reasons seen in [start, end]."""
        inside = [s for t, s in self.samples if start <= t <= end]
        if not inside:
            return {}

        def numbers(field):
            out = []
            for sample in inside:
                try:
                    out.append(float(sample[field]))
                except (KeyError, ValueError):
                    pass
            return out

        clock, power, temperature = numbers("clocks.sm"), numbers("power.draw"), numbers("temperature.gpu")
        summary = {"samples": len(inside)}
        if clock:
            summary |= {"sm_clock_mhz": statistics.median(clock), "sm_clock_min_mhz": min(clock)}
        if power:
            summary["power_w"] = statistics.median(power)
        if temperature:
            summary["temperature_max_c"] = max(temperature)
        reasons = sorted({s[REASONS] for s in inside if s.get(REASONS) not in (None, "0x0000000000000000")})
        if REASONS in self.fields:
            summary["clock_event_reasons"] = reasons
        return summary


def profiled_steps(first: int, count: int, table_path: Path):
    """A TrainerCallback that profiles optimizer steps first..first+count-1 and writes the kernel table."""
    import torch
    from transformers import TrainerCallback

    class ProfileSteps(TrainerCallback):
        def __init__(self):
            self.profiler, self.began, self.summary = None, None, {}

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first and self.profiler is None:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                    torch.cuda.synchronize()
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()
                self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is None or self.summary or state.global_step < first + count:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.began
            self.profiler.__exit__(None, None, None)
            averages = self.profiler.key_averages()
            kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
            self.summary = {"profiled_steps": count, "wall_s_per_step": wall / count,
                            "kernel_s_per_step": sum(e.self_device_time_total for e in kernels) / 1e6 / count,
                            "kernels_per_step": sum(e.count for e in kernels) / count}
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            table_path.write_text(averages.table(sort_by=sort, row_limit=30, max_name_column_width=70) + "\n")

    return ProfileSteps()
