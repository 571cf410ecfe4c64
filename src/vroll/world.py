"""The training job's processes as ``torch.distributed`` sees them.

DeepSpeed always runs in a process group, and vLLM's ``external_launcher`` (the colocated
engine) reads the ``env://`` variables too: a plain ``python -m vroll`` run is given those of a
one-process job.
"""

from __future__ import annotations

import os
import socket


def ensure_distributed_env() -> None:
    """The env:// variables of a one-process job, where no launcher set them."""
    if "RANK" in os.environ or "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
