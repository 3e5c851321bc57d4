"""The training recipes, in torchtune's shape (setup / train / save / cleanup), each a small file over the library's
components: `vrm` (VRM and BT reward models on Ray Train with DeepSpeed) and `drm` (embed, decompose, evaluate).
`train_vrm.py` / `rewardprism train` and `train_drm.py` run them; the Tune sweeps call them too."""
from __future__ import annotations

import os


def connect_ray(env_vars: dict[str, str] | None = None) -> bool:
    """Join RAY_ADDRESS or a `ray start` cluster on this machine, else start a local one; True if this call did.

    The address the driver joined is passed on to every worker of the job (with `env_vars`): Ray Train's
    placement-group cleaner looks its cluster up by RAY_ADDRESS from inside it, and on a host running several
    Ray clusters finds none without it — a `ray job submit` log then shows "Found multiple active Ray
    instances" tracebacks, and a trial stopped by ASHA never returns its CPUs. A Ray job merges these variables
    into the job's own runtime environment.
    """
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    env = {**(env_vars or {}), **({"RAY_ADDRESS": address} if address else {})}
    ray.init(runtime_env={"env_vars": env} if env else None)
    return True
