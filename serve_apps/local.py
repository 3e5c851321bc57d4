"""Run config.yaml on a local Ray cluster with overrides: what the tests and the benchmark deploy.

They deploy the real config the way an operator does (`serve run CONFIG --non-blocking`), resized for the
machine and pointed at their own database, so a change to config.yaml is tested too. A redeploy that changes
only `user_config` reconfigures the running replicas in place. Fault tests and benchmarks get a Postgres
cluster of their own (`postgres_cluster`) to freeze and stop.
"""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


def run_config(port: int, *apps: dict, timeout_s: float = 300, proxy_location: str = "EveryNode") -> None:
    """Deploy exactly these applications (others are removed), serving HTTP on 127.0.0.1:`port`; wait until
    they run. Needs `ray.init()` first (or starts a local cluster). Several nodes on one machine cannot all
    bind `port`: a cluster of them serves with `proxy_location="HeadOnly"`."""
    from ray import serve
    from ray.serve.scripts import cli

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump({"proxy_location": proxy_location, "http_options": {"host": "127.0.0.1", "port": port},
                        "applications": list(apps)}, f)
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


@dataclass
class PostgresCluster:
    """A throwaway Postgres cluster of the caller's own (`postgres_cluster`), for faults no shared server may
    suffer: frozen with SIGSTOP (a hung machine: connections stay open, nothing answers) or stopped."""

    version: str
    name: str
    url: str
    data_dir: Path

    def processes(self) -> list[int]:
        """The postmaster and every process it started (backends, checkpointer, ...)."""
        postmaster = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        return [postmaster, *map(int, children)]

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """The whole server stopped with SIGSTOP inside the block, continued whatever happens there."""
        pids = self.processes()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    def ctl(self, action: str) -> None:
        """`pg_ctlcluster` start, stop (fast shutdown) or restart."""
        subprocess.run(["pg_ctlcluster", self.version, self.name, action], check=True, capture_output=True)


@contextmanager
def postgres_cluster(name: str, port: int, version: str = "15") -> Iterator[PostgresCluster]:
    """A new cluster `name` on `port` (trust auth on loopback, for user postgres), dropped on exit; one left by
    a killed run is dropped first. Needs root and postgresql-common (`pg_createcluster`)."""
    subprocess.run(["pg_dropcluster", "--stop", version, name], capture_output=True)
    subprocess.run(["pg_createcluster", version, name, "--port", str(port), "--start", "--", "--auth=trust"],
                   check=True, capture_output=True)
    try:
        data_dir = subprocess.run(["pg_conftool", "-s", version, name, "show", "data_directory"], check=True,
                                  capture_output=True, text=True).stdout.strip()
        yield PostgresCluster(version, name, f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres",
                              Path(data_dir))
    finally:
        subprocess.run(["pg_dropcluster", "--stop", version, name], capture_output=True)
