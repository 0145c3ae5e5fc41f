"""benchmarks/step_diagnostics.py: the summary of GPU samples over a time window."""

from __future__ import annotations

from tests.conftest import REPO_ROOT, load_script

diagnostics = load_script(REPO_ROOT / "benchmarks" / "step_diagnostics.py")


def test_window_summarises_only_the_samples_inside():
    sampler = diagnostics.GpuSampler.__new__(diagnostics.GpuSampler)  # no nvidia-smi on this machine
    sampler.fields = diagnostics.FIELDS + [diagnostics.REASONS]
    sample = lambda clock, power, temp, reason: dict(  # noqa: E731
        zip(sampler.fields, [str(clock), str(power), str(temp), reason], strict=True))
    sampler.samples = [(0.5, sample(1000, 100, 40, "0x0000000000000000")),
                       (1.0, sample(1980, 600, 60, "0x0000000000000000")),
                       (1.5, sample(1700, 690, 65, "0x0000000000000004")),
                       (2.0, sample(1800, "[N/A]", 62, "0x0000000000000004")),
                       (3.0, sample(500, 50, 80, "0x0000000000000000"))]
    summary = sampler.window(1.0, 2.0)
    assert summary["samples"] == 3
    assert summary["sm_clock_mhz"] == 1800 and summary["sm_clock_min_mhz"] == 1700
    assert summary["power_w"] == (600 + 690) / 2  # the unreadable value is skipped
    assert summary["temperature_max_c"] == 65
    assert summary["clock_event_reasons"] == ["0x0000000000000004"]
    assert sampler.window(5.0, 6.0) == {}
