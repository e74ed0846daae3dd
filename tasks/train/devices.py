"""What devices a run saw: the GPUs its work pool gave it (CUDA_VISIBLE_DEVICES in the pool's job template,
deployments/pools.yaml) and what torch finds behind them. The training process inherits this environment,
so the record is also what training started its processes on; the tracks report reads it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from prefect import task

from tasks.run import RunFolder, atomic_write_json


def visible_devices() -> dict:
    """CUDA_VISIBLE_DEVICES as this process has it (None: unset, every GPU; "": none), and torch's view."""
    import torch

    count = torch.cuda.device_count()
    return {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cuda_device_count": count,
            "gpu_names": [torch.cuda.get_device_name(i) for i in range(count)],
            "host": socket.gethostname(), "pid": os.getpid()}


@task(name="record-devices")
def record_devices(run_dir: Path) -> dict:
    """Write metrics/devices.json of the run: the devices its flow run (and so its training) saw."""
    devices = visible_devices()
    atomic_write_json(RunFolder(run_dir).devices, devices)
    return devices
