"""A py-spy profile of one server process over the measured window (`--profile`).

py-spy (the `bench` extra of pyproject.toml, installed in the project venv) samples the
process from outside; its "raw" output is one line per distinct stack, `frame;...;leaf count`.
The summary is the frames holding the most samples: by self time (the leaf) and by total time
(anywhere on the stack).
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from keyval.bench.errors import BenchError

SAMPLE_RATE_HZ = 200  # py-spy's default is 100; the windows are short
TOP_FRAMES = 15  # lines of each summary
# py-spy writes a sample with no Python frame (a thread in native code) as " count".
NO_PYTHON_FRAME = "(no Python frame)"
FINISH_GRACE_S = 30.0  # py-spy writes its file after the duration; give it this long


class ProfilerMissing(BenchError):
    """py-spy is not installed: the profile is skipped."""


# The total-time list shows keyval's own frames (not trio's or the standard library's), and
# leaves out the trunk nearly every sample passes through (main, the event loop's entry):
# frames within TRUNK_FRACTION of the most frequent one.
PROJECT_FILE_PREFIXES = ("keyval/", "wire/", "auth/")
TRUNK_FRACTION = 0.95


@dataclass(frozen=True, slots=True)
class ProfileSummary:
    samples: int
    self_top: list[tuple[str, float]]  # (frame, percent of samples)
    self_by_file: list[tuple[str, float]]  # (source file, percent of samples)
    total_top: list[tuple[str, float]]  # keyval's own frames, trunk left out

    def lines(self) -> list[str]:
        out = [f"{self.samples} samples; self time by source file:"]
        out += [f"  {percent:5.1f}%  {name}" for name, percent in self.self_by_file]
        out.append("top frames by self time:")
        out += [f"  {percent:5.1f}%  {name}" for name, percent in self.self_top]
        out.append("keyval frames by total time (on the stack):")
        out += [f"  {percent:5.1f}%  {name}" for name, percent in self.total_top]
        return out


def without_line(frame: str) -> str:
    """ "name (path/file.py:123)" -> "name (path/file.py)": samples add up per function."""
    head, paren, location = frame.rpartition(" (")
    if not paren:
        return frame
    path, colon, line = location.rstrip(")").rpartition(":")
    return f"{head} ({path})" if colon and line.isdigit() else frame


def source_file(frame: str) -> str:
    """ "name (path/file.py:123)" -> "path/file.py"; a frame without a location as is."""
    _, paren, location = frame.rpartition(" (")
    if not paren:
        return frame
    return location.rstrip(")").rpartition(":")[0] or location.rstrip(")")


class Profiler:
    def __init__(self, pid: int, output: Path) -> None:
        executable = shutil.which("py-spy")
        if executable is None:
            raise ProfilerMissing("skipped: py-spy not installed (the project venv's bench extra)")
        self._executable = executable
        self._pid = pid
        self._output = output
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, duration_s: float) -> None:
        argv = [self._executable, "record", "--pid", str(self._pid), "--format", "raw"]
        argv += ["--rate", str(SAMPLE_RATE_HZ), "--duration", str(max(1, round(duration_s)))]
        argv += ["--output", str(self._output), "--nonblocking"]
        self._process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )

    def finish(self) -> ProfileSummary:
        if self._process is None:
            raise BenchError("the profiler was never started")
        try:
            _, stderr = self._process.communicate(timeout=FINISH_GRACE_S)
        except subprocess.TimeoutExpired as error:
            self._process.kill()
            self._process.wait()
            raise BenchError("py-spy did not finish") from error
        if self._process.returncode != 0 or not self._output.exists():
            raise BenchError(f"py-spy failed: {stderr.decode(errors='replace').strip()[-200:]}")
        return summarize(self._output.read_text())


def summarize(raw: str, top: int = TOP_FRAMES) -> ProfileSummary:
    """Summary of py-spy's raw (collapsed stack) output; malformed lines raise BenchError."""
    self_samples: Counter[str] = Counter()
    file_samples: Counter[str] = Counter()
    total_samples: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        if not line.strip():
            continue
        stack, separator, count_text = line.rpartition(" ")
        if not separator or not count_text.isdigit():
            raise BenchError(f"py-spy output line is not 'stack count': {line[:100]!r}")
        count = int(count_text)
        frames = [without_line(f) for f in stack.split(";")] if stack else [NO_PYTHON_FRAME]
        samples += count
        self_samples[frames[-1]] += count
        file_samples[source_file(frames[-1])] += count
        for frame in set(frames):
            if source_file(frame).startswith(PROJECT_FILE_PREFIXES):
                total_samples[frame] += count
    if samples == 0:
        return ProfileSummary(0, [], [], [])

    def percents(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(frame, 100.0 * n / samples) for frame, n in counter.most_common()]

    totals = percents(total_samples)
    trunk_percent = totals[0][1] * TRUNK_FRACTION if totals else 0.0
    below_trunk = [item for item in totals if item[1] < trunk_percent]
    return ProfileSummary(
        samples,
        percents(self_samples)[:top],
        percents(file_samples)[:top],
        below_trunk[:top],
    )
