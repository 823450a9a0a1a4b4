"""The device's run config: ``DeviceConfig``, every key the ClientApp reads, in sections.

The ClientApp reads it once per message, ``DeviceConfig.from_run_config(context.run_config)``
(``protocol.run_config.read``: no fallbacks; pyproject.toml holds the defaults and Flower merges them
into every run). What the server decides for a round travels in its messages instead (the probe
settings of an XPerT selection, the fine-tuning budget, compare-scratch); the sections read here that
the server reads too (``Common``, ``Probe``, ``Reports``) are the same dataclasses, so both sides read
one field per key.
"""

from __future__ import annotations

from dataclasses import dataclass

from clients.users import DataConfig
from protocol.run_config import Common, Probe, Reports, Section


@dataclass(frozen=True)
class DeviceSettings(Section):
    """The device's own resources and engine."""

    device_threads: int  # torch threads of a device (<= 0: torch's default, all cores)
    trainer: str  # fine-tuning engine: "torch" (PyTorch + PEFT) | "ort" (ONNX Runtime training)

    def threads(self) -> int | None:
        """The thread count to set, or None for torch's default."""
        return self.device_threads if self.device_threads > 0 else None


@dataclass(frozen=True)
class DeviceConfig(Section):
    """Every key a device reads (the server's: ``strategies.config.XPerTConfig``)."""

    common: Common  # the models, the corpus its data comes from, the seed of that data
    data: DataConfig  # which user's data it has (``clients.users``)
    reports: Reports  # whether it reports its label and a self-report
    probe: Probe  # the settings its self-report embeds its data with, as the server probes
    device: DeviceSettings
