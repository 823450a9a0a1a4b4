"""Cost accounting of a fine-tuning run: energy and peak memory.

Why a module of its own: every engine (PyTorch here, ONNX Runtime in ``xpert_fl.device``) and the
benchmarks measure the same way, so their costs compare. ``peak_memory_mb`` is the process RSS peak
during the run (:class:`PeakRSS`); energy is a RAPL reading when
``/sys/class/powercap/intel-rapl:0/energy_uj`` is readable, else an estimate (process CPU seconds x
:data:`DEFAULT_WATTS_PER_CORE`), see :class:`EnergyMeter`.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

# Energy estimate when no RAPL counter is readable: watts drawn per busy core. This machine reports
# an AMD EPYC family 25 (Zen 3, "Milan") CPU; the 64-core EPYC 7763 has a 280 W TDP, i.e. ~4.4 W per
# core at full package power (uncore and I/O die included, DRAM not). Rounded up to 5 W. It is an
# ESTIMATE of the order of magnitude, not a measurement (a phone big core draws ~1-3 W, a desktop
# core under AVX load 5-15 W); set FinetuneConfig.watts_per_core for another machine.
DEFAULT_WATTS_PER_CORE = 5.0
RAPL_ENERGY = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


class EnergyMeter:
    """Energy of a code region: RAPL package counter if readable, else CPU time x watts per core.

    ``method`` is ``"rapl"`` (``energy_uj`` of ``intel-rapl:0``: the whole CPU package, every
    process on it, wrap-around handled) or ``"cpu-time x W/core estimate"`` (this process's user+sys
    CPU seconds over all its threads x ``watts_per_core``; idle/static power and DRAM not counted).
    """

    def __init__(self, watts_per_core: float = DEFAULT_WATTS_PER_CORE, rapl_path: Path | None = RAPL_ENERGY):
        self.watts_per_core = watts_per_core
        self.rapl_path = rapl_path
        self.method = "rapl" if self._read_rapl() is not None else "cpu-time x W/core estimate"
        self._cpu0 = time.process_time()
        self._rapl0 = self._read_rapl() if self.method == "rapl" else None
        self._rapl_last = self._rapl0
        self._rapl_acc = 0

    def _read_rapl(self) -> int | None:
        if self.rapl_path is None:
            return None
        try:
            return int(self.rapl_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _rapl_range(self) -> int:
        try:
            return int((self.rapl_path.parent / "max_energy_range_uj").read_text().strip())
        except (OSError, ValueError, AttributeError):
            return 2**32

    @property
    def cpu_seconds(self) -> float:
        return time.process_time() - self._cpu0

    def joules(self) -> float:
        """Energy since construction (call at least once per counter wrap period for RAPL)."""
        if self.method == "rapl":
            now = self._read_rapl()
            if now is not None and self._rapl_last is not None:
                delta = now - self._rapl_last
                self._rapl_acc += delta if delta >= 0 else delta + self._rapl_range()
                self._rapl_last = now
            return self._rapl_acc / 1e6
        return self.cpu_seconds * self.watts_per_core


class PeakRSS:
    """Peak resident memory of this process during a run.

    Linux: the kernel's high-water mark is reset by writing ``5`` to ``/proc/self/clear_refs`` and read
    as ``VmHWM`` afterwards, so the figure is the peak *during the run* ("rss-peak-run"). Elsewhere,
    or if the reset is refused: ``getrusage`` ``ru_maxrss``, the peak of the process's whole life
    ("rss-peak-process"). Either way the whole process is counted: base weights included.
    """

    def __init__(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "rss-peak-run"
        except OSError:
            self.method = "rss-peak-process"

    def mb(self) -> float:
        if self.method == "rss-peak-run":
            try:
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
            except (OSError, ValueError, IndexError):
                pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
