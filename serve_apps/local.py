"""Run config.yaml on a local Ray cluster with overrides: what the tests and the benchmark deploy.

They deploy the real config the way an operator does (`serve run CONFIG --non-blocking`), resized for the
machine and pointed at their own database, so a change to config.yaml is tested too. A redeploy that changes
only `user_config` reconfigures the running replicas in place.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

CONFIG = Path(__file__).resolve().parent / "config.yaml"


def app_config(name: str, route_prefix: str, env: dict[str, str], *, replicas: int | dict[str, int] = 1,
               num_cpus: dict[str, float] | None = None, user_config: dict[str, Any] | None = None) -> dict:
    """The application of config.yaml under another name and prefix, with literal env vars (no `${...}`),
    fixed replica counts (for all, or per deployment name), `num_cpus` per deployment name, and `user_config`
    merged into the Ingress's."""
    app = yaml.safe_load(CONFIG.read_text())["applications"][0]
    app.update(name=name, route_prefix=route_prefix)
    app["runtime_env"]["env_vars"] = {"TOKENIZERS_PARALLELISM": "false", **env}
    for deployment in app["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = replicas if isinstance(replicas, int) else replicas.get(deployment["name"], 1)
        deployment["ray_actor_options"] = {"num_cpus": (num_cpus or {}).get(deployment["name"], 0.1)}
        if deployment["name"] == "Ingress":
            deployment["user_config"].update(user_config or {})
    return app


def run_config(port: int, *apps: dict, timeout_s: float = 300) -> None:
    """Deploy exactly these applications (others are removed), serving HTTP on 127.0.0.1:`port`; wait until
    they run. Needs `ray.init()` first (or starts a local cluster)."""
    from ray import serve
    from ray.serve.scripts import cli

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump({"http_options": {"host": "127.0.0.1", "port": port}, "applications": list(apps)}, f)
    try:
        cli.main(args=["run", f.name, "--non-blocking"], prog_name="serve", standalone_mode=False)
    finally:
        os.unlink(f.name)
    deadline = time.monotonic() + timeout_s
    wanted = {a["name"] for a in apps}
    while True:
        status = serve.status().applications
        states = {name: status[name].status if name in status else "MISSING" for name in wanted | set(status)}
        if set(status) == wanted and all(s == "RUNNING" for s in states.values()):
            return
        if "DEPLOY_FAILED" in states.values() or time.monotonic() > deadline:
            raise RuntimeError(f"applications did not start: {states}; {status}")
        time.sleep(0.5)
