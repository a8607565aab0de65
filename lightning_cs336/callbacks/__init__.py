"""Telemetry callbacks for Lightning: drop them into any ``Trainer(callbacks=[...])`` or LightningCLI config.

They import only torch and lightning (wandb lazily), never this package's model, module or data, so any Lightning
project can use them. What they need from a LightningModule is duck-typed and documented on each class.

| callback | keys |
|---|---|
| :class:`GradientNormMonitor` | ``grad/*`` |
| :class:`MemoryMonitor` | ``memory/*`` |
| :class:`SpeedMonitor` | ``time/*``, ``throughput/*`` |
| :class:`TextSampleLogger` | ``samples/*`` |
| :class:`CheckpointArtifactLogger` | ``checkpoint/*`` (+ W&B model artifacts) |
| :class:`RunInfoLogger` | ``run_info`` config, ``summary/*`` |
| :class:`HistogramLogger` | ``weights/*``, ``gradients/*`` |
| :class:`StabilityMonitor` | ``stability/*`` (+ table ``stability/spikes``) |
| :class:`OptimizerMonitor` | ``optim/*`` |
| :class:`StepTimeMonitor` | ``time/data_wait_pct``, ``time/step_ms_p*``, ``time/rank/*``, ``memory/rank/*`` |

The learning rate is Lightning's own :class:`~lightning.pytorch.callbacks.LearningRateMonitor`.

Layout: ``_base`` (the step clock, the base class, shared helpers), ``_sinks`` (every value's way to the loggers,
with the fallbacks for loggers that lack an object kind), ``_compat`` (every read of Lightning internals),
``peak_flops`` (the MFU peak table with its sources), ``wandb_access`` (credentials and artifact references, shared
with the ``cs336`` command), then one file per callback.
"""

from lightning_cs336.callbacks._base import StepClock, TelemetryCallback
from lightning_cs336.callbacks.checkpoint_artifacts import CheckpointArtifactLogger
from lightning_cs336.callbacks.grad_norm import GradientNormMonitor
from lightning_cs336.callbacks.histograms import HistogramLogger
from lightning_cs336.callbacks.memory import MemoryMonitor
from lightning_cs336.callbacks.optimizer_monitor import OptimizerMonitor
from lightning_cs336.callbacks.run_info import RunInfoLogger
from lightning_cs336.callbacks.speed import SpeedMonitor
from lightning_cs336.callbacks.stability import StabilityMonitor
from lightning_cs336.callbacks.step_time import StepTimeMonitor
from lightning_cs336.callbacks.text_samples import TextSampleLogger
from lightning_cs336.callbacks.wandb_access import load_from_artifact, resolve_checkpoint

__all__ = [
    "CheckpointArtifactLogger",
    "GradientNormMonitor",
    "HistogramLogger",
    "MemoryMonitor",
    "OptimizerMonitor",
    "RunInfoLogger",
    "SpeedMonitor",
    "StabilityMonitor",
    "StepClock",
    "StepTimeMonitor",
    "TelemetryCallback",
    "TextSampleLogger",
    "load_from_artifact",
    "resolve_checkpoint",
]
