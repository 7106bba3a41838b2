"""System metrics (CPU, memory, disk, network; GPUs where pynvml finds them) as MLflow's ``system/*`` metrics.

MLflow's own monitors take the readings (``log_system_metrics`` uses the same ones, and the UI's System
metrics tab shows them), but their logger stops for good at the first failed request, so an outage would
end them. Here a thread samples every 10 s (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``) and the learner's
metric log takes the samples like any other metric: kept through outages, step numbers continued by a
resumed run. A sample costs well under a millisecond of the learner's time every 10 s.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from orchestrator.errors import one_line

log = logging.getLogger("metaray")
EVERY_S = 10.0  # MLflow's default sampling interval


class SystemSampler:
    def __init__(self, monitors: list[Any], step: int, every_s: float):
        self._monitors, self._step = monitors, step
        self._lock = threading.Lock()
        self._samples: list[tuple[int, int, dict[str, float]]] = []
        self._stop = threading.Event()
        for m in monitors:  # the first CPU reading only sets psutil's reference point
            m.collect_metrics()
            m.clear_metrics()
        threading.Thread(target=self._loop, args=(every_s,), name="metaray-system-metrics", daemon=True).start()

    @classmethod
    def start(cls, step: int) -> SystemSampler | None:
        """A sampler whose first sample is MLflow step ``step``; None (with a warning) where psutil is missing."""
        try:
            from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
            from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
            from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
            from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

            monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        except Exception as e:  # noqa: BLE001 - e.g. no psutil: the run goes on without system metrics
            log.warning("tracking: no system metrics (%s); pip install psutil (and nvidia-ml-py for GPUs)",
                        one_line(e, 160))
            return None
        for gpu in (GPUMonitor, ROCMMonitor):  # as MLflow does: NVIDIA through pynvml, else AMD
            try:
                monitors.append(gpu())
                break
            except Exception:  # noqa: BLE001 - no such GPU, or no library for it
                pass
        return cls(monitors, step, float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or EVERY_S))

    def _loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.sample()

    def sample(self) -> None:
        values: dict[str, float] = {}
        for m in self._monitors:
            try:
                m.collect_metrics()
                values.update(m.aggregate_metrics())
            except Exception:  # noqa: BLE001 - one failing probe (e.g. a GPU gone) leaves the others
                pass
            m.clear_metrics()
        with self._lock:
            self._samples.append((self._step, int(time.time() * 1000),
                                  {f"system/{k}": float(v) for k, v in values.items()}))
            self._step += 1

    def take(self) -> list[tuple[int, int, dict[str, float]]]:
        """The samples taken since the last call: (step, timestamp_ms, metrics)."""
        with self._lock:
            out, self._samples = self._samples, []
        return out

    def stop(self) -> None:
        """End sampling with a last sample, so that even a run shorter than the interval has one."""
        self._stop.set()
        self.sample()
