"""Telemetry callbacks for Lightning: drop them into any ``Trainer(callbacks=[...])``.

They import only torch and lightning (wandb lazily), never this package's model, module or data.
"""

from lightning_cs336.callbacks._base import TelemetryCallback

__all__ = ["TelemetryCallback"]
