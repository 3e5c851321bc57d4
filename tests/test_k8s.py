"""The Kubernetes manifests in k8s/, rendered by `kubectl kustomize` and validated offline (k8s/validate.py).

Every kustomization under k8s/overlays is rendered; each custom resource is checked against its KubeRay CRD
schema made strict, each core object against the pinned Kubernetes schemas of `kubernetes-validate`. On top of
the schemas: the RayService serves exactly serve_apps/config.yaml, the RayJobs run scripts and configs that
exist, the migration runs before the service, every Pod is non-root with requests and limits, and versions
agree between pyproject.toml, the Makefile, the Dockerfile and the manifests. Broken manifests must fail.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
IMAGE_TREE = "/home/ray/rewardprism"  # where k8s/Dockerfile puts the checkout (its WORKDIR)
SHARED_MOUNT = "/mnt/shared"  # the runs volume in every Ray Pod (k8s/base/runs-pvc.yaml)


def _load(path: Path, name: str):
    """Import a script that is not in a package (k8s/*.py, train_drm.py) as module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


v = _load(K8S / "validate.py", "rewardprism_k8s_validate")
render_serve_config = _load(K8S / "render_serve_config.py", "rewardprism_k8s_render_serve_config")

PLATFORM = {"dev": K8S / "overlays/dev", "prod": K8S / "overlays/prod"}
JOBS = {"dev": K8S / "overlays/dev/jobs", "prod": K8S / "overlays/prod/jobs"}


@pytest.fixture(scope="module")
def crds() -> None:
    """The KubeRay CRDs the custom resources are checked against (../shared/k8s-crds, or $RP_K8S_CRDS): the
    tests that need them skip, naming the folder, where a checkout has none."""
    if not any(v.CRD_DIR.glob("*.yaml")):
        pytest.skip(f"no KubeRay CRDs in {v.CRD_DIR} (set $RP_K8S_CRDS to a folder of CRD yaml files)")


@pytest.fixture(scope="module")
def rendered() -> dict[Path, list[dict[str, Any]]]:
    """Every kustomization under k8s/overlays, rendered once for the module."""
    found = v.kustomizations()
    assert set(PLATFORM.values()) | set(JOBS.values()) <= set(found), found
    return {path: v.render(path) for path in found}


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[v.describe(o) for o in found]}"
    return found[0]


def in_repo(path: str) -> Path:
    """A path inside the image's source tree, as the checkout file it was copied from."""
    assert path.startswith(IMAGE_TREE), path
    return ROOT / os.path.relpath(path, IMAGE_TREE)


def _ray_cluster_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "RayCluster":
        return [obj["spec"]]
    if obj["kind"] == "RayService":
        return [obj["spec"]["rayClusterConfig"]]
    return []


def ray_groups(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]


# ------------------------------------------------------------------------------------------------ schemas
@pytest.mark.parametrize("overlay", sorted(v.kustomizations()), ids=lambda p: str(p.relative_to(K8S)))
def test_overlay_renders_and_every_object_validates(crds, rendered, overlay):
    objects = rendered[overlay]
    assert objects, f"{overlay} rendered nothing"
    v.validate(objects)  # raises ManifestError naming object and field
    crs = [o for o in objects if o["apiVersion"].startswith("ray.io/")]
    assert all((o["apiVersion"], o["kind"]) in v.crd_validators() for o in crs)


def test_overlays_hold_what_each_environment_needs(rendered):
    kinds = {env: sorted(v.describe(o) for o in rendered[path]) for env, path in PLATFORM.items()}
    platform = [
        "Job/rewardprism-migrate",
        "PersistentVolumeClaim/rewardprism-runs",
        "RayCluster/rewardprism",
        "RayService/rewardprism-scorer",
    ]
    assert kinds["dev"] == sorted(
        platform + ["Service/rewardprism-postgres", "StatefulSet/rewardprism-postgres",
                    "Service/rewardprism-redis", "StatefulSet/rewardprism-redis"]
    )
    assert kinds["prod"] == platform  # prod's database and Redis are external: DATABASE_URL and redisAddress
    for env in ("dev", "prod"):
        assert sorted(v.describe(o) for o in rendered[JOBS[env]]) == ["RayJob/train-drm", "RayJob/train-vrm"]
    namespaces = {
        env: {o["metadata"]["namespace"] for o in rendered[PLATFORM[env]] + rendered[JOBS[env]]}
        for env in PLATFORM
    }
    assert namespaces == {"dev": {"rewardprism-dev"}, "prod": {"rewardprism"}}
    # dev's database: a StatefulSet whose data lives on a claim, behind the Service DATABASE_URL names
    dev = rendered[PLATFORM["dev"]]
    for component in ("postgres", "redis"):  # and the scorer's Redis likewise, behind its redisAddress
        (stateful,) = [o for o in by_kind(dev, "StatefulSet") if component in o["metadata"]["name"]]
        (service,) = [o for o in by_kind(dev, "Service") if component in o["metadata"]["name"]]
        assert stateful["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
        assert stateful["spec"]["serviceName"] == service["metadata"]["name"]


def test_the_scorer_keeps_its_gcs_tables_in_redis(rendered):
    """GCS fault tolerance: the RayService's head keeps the cluster's tables in Redis (dev: the in-cluster one,
    by its Service; prod: a managed one), with the password from the Secret, so losing the head Pod does not
    take the Serve application down (bench/bench_cluster.py: a GCS restart under load fails no call)."""
    for env, path in PLATFORM.items():
        options = one(rendered[path], "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
        host, _, port = options["redisAddress"].rpartition(":")
        assert port == "6379" and options["redisPassword"]["valueFrom"]["secretKeyRef"] == {
            "name": "rewardprism-secrets", "key": "REDIS_PASSWORD"}
        services = [o["metadata"]["name"] for o in by_kind(rendered[path], "Service")]
        assert (host in services) is (env == "dev"), (env, host, services)


def test_runs_volume_is_shared_by_every_ray_pod(rendered):
    """Checkpoints and exported head sets land on one claim that training writes and the scorer reads."""
    for env, path in PLATFORM.items():
        claim = one(rendered[path], "PersistentVolumeClaim")
        assert claim["spec"]["accessModes"] == {"dev": ["ReadWriteOnce"], "prod": ["ReadWriteMany"]}[env]
        for obj in rendered[path]:
            for cluster in _ray_cluster_specs(obj):
                for group in ray_groups(cluster):
                    pod = group["template"]["spec"]
                    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "runs"]
                    assert mount["mountPath"] == SHARED_MOUNT
                    assert mount.get("readOnly", False) is (obj["kind"] == "RayService")
                    (volume,) = [vol for vol in pod["volumes"] if vol["name"] == "runs"]
                    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_training_cluster_groups_and_autoscaling_bounds(rendered):
    for objects in rendered.values():
        for obj in objects:
            for cluster in _ray_cluster_specs(obj):
                assert cluster["enableInTreeAutoscaling"] is True
                for group in cluster["workerGroupSpecs"]:
                    bounds = group["minReplicas"], group["replicas"], group["maxReplicas"]
                    assert 0 <= bounds[0] <= bounds[1] <= bounds[2], (
                        v.describe(obj),
                        group["groupName"],
                        bounds,
                    )
    gpu_limits = {
        env: [
            g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            for g in one(rendered[path], "RayCluster")["spec"]["workerGroupSpecs"]
        ]
        for env, path in PLATFORM.items()
    }
    assert gpu_limits == {"dev": [None], "prod": [None, 1]}  # dev: CPU only; prod: CPU and GPU workers
    gpu = one(rendered[PLATFORM["prod"]], "RayCluster")["spec"]["workerGroupSpecs"][1]
    assert gpu["groupName"] == "gpu" and gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    assert gpu["template"]["spec"]["containers"][0]["image"].endswith("-gpu")
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])


# ------------------------------------------------------------------------------- broken on purpose: must fail
BREAKS = {
    # custom resources, against the CRD schema
    "RayCluster: unknown field in a container": (
        "RayCluster",
        lambda o: o["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            imagePullPolicyy="Always"
        ),
        "'imagePullPolicyy' was unexpected",
    ),
    "RayCluster: unknown field in the spec": (
        "RayCluster",
        lambda o: o["spec"].update(workerGroups=[]),
        "'workerGroups' was unexpected",
    ),
    "RayCluster: string where an integer goes": (
        "RayCluster",
        lambda o: o["spec"]["workerGroupSpecs"][0].update(maxReplicas="2"),
        "is not of type 'integer'",
    ),
    "RayCluster: integer beyond int32": (
        "RayCluster",
        lambda o: o["spec"]["workerGroupSpecs"][0].update(maxReplicas=2**31),
        "is not a 'int32'",
    ),
    "RayCluster: missing required groupName": (
        "RayCluster",
        lambda o: o["spec"]["workerGroupSpecs"][0].pop("groupName"),
        "'groupName' is a required property",
    ),
    "RayCluster: malformed CPU quantity": (
        "RayCluster",
        lambda o: o["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"][
            "limits"
        ].update(cpu="two"),
        "does not match",
    ),
    "RayCluster: duplicate env var (list-type=map)": (
        "RayCluster",
        lambda o: o["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": "DATABASE_URL", "value": "x"}
        ),
        "share the key",
    ),
    "RayCluster: unknown metadata field": (
        "RayCluster",
        lambda o: o["metadata"].update(label={"a": "b"}),
        "'label' was unexpected",
    ),
    "RayCluster: a field guarded by CEL rules": (
        "RayCluster",
        lambda o: o["spec"].update(managedBy="ray.io/kuberay-operator"),
        "CEL rules",
    ),
    "RayService: serveConfigV2 as a mapping, not a string": (
        "RayService",
        lambda o: o["spec"].update(serveConfigV2={"applications": []}),
        "is not of type 'string'",
    ),
    # core objects, against the Kubernetes schemas
    "Job: unknown field": ("Job", lambda o: o["spec"].update(retries=3), "'retries' was unexpected"),
    "Job: string where an integer goes": (
        "Job",
        lambda o: o["spec"].update(backoffLimit="6"),
        "is not of type 'integer'",
    ),
    "StatefulSet: unknown container field": (
        "StatefulSet",
        lambda o: o["spec"]["template"]["spec"]["containers"][0].update(ports_="5432"),
        "was unexpected",
    ),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_validation_fails_on_a_broken_object(crds, rendered, name):
    kind, breaks, expected = BREAKS[name]
    obj = copy.deepcopy(by_kind(rendered[PLATFORM["dev"]], kind)[0])
    assert v.object_errors(obj) == []  # the intact object passes ...
    breaks(obj)
    errors = v.object_errors(obj)  # ... the broken one does not
    assert any(expected in e for e in errors), errors


def test_unknown_kind_fails(crds, rendered):
    obj = {"apiVersion": "ray.io/v1", "kind": "RayClustre", "metadata": {"name": "x"}, "spec": {}}
    assert "no CRD" in v.object_errors(obj)[0]
    obj = {"apiVersion": "v1", "kind": "Confimap", "metadata": {"name": "x"}}
    assert v.object_errors(obj)


@pytest.mark.parametrize(
    "edit",
    [
        (
            "base/raycluster.yaml",
            "      maxReplicas: 2\n",
            "      maxReplicas: 2\n      maxReplica: 3\n",
            "'maxReplica' was unexpected",
        ),
        ("base/migrate-job.yaml", "  backoffLimit: 6", "  backoffLimit: six", "is not of type 'integer'"),
    ],
    ids=["unknown-field", "wrong-type"],
)
def test_a_broken_manifest_file_fails_the_validator_cli(crds, tmp_path, capsys, edit):
    """End to end: edit a copy of the manifest files, render the dev overlay from it, and the CLI exits 1."""
    file, old, new, expected = edit
    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "k8s" / file
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new, 1))
    assert v.main([str(tmp_path / "k8s/overlays/dev")]) == 1
    assert expected in capsys.readouterr().err
    assert v.main([str(PLATFORM["dev"])]) == 0  # and the real one passes


# ------------------------------------------------------------------------------------- one Serve config
def test_serve_config_v2_is_serve_apps_config_yaml(rendered):
    config_text = render_serve_config.SERVE_CONFIG.read_text()
    assert render_serve_config.PATCH.read_text() == render_serve_config.render(config_text), (
        "k8s/base/rayservice-serve-config.yaml is stale: run `python k8s/render_serve_config.py`"
    )
    for path in PLATFORM.values():
        served = one(rendered[path], "RayService")["spec"]["serveConfigV2"]
        assert served == config_text
        assert yaml.safe_load(served) == yaml.safe_load(config_text)


def test_render_serve_config_check_detects_drift(tmp_path, monkeypatch):
    config = tmp_path / "config.yaml"
    config.write_text(
        "# a comment survives\napplications:\n  - name: a\n    import_path: serve_apps.app:app\n"
    )
    monkeypatch.setattr(render_serve_config, "SERVE_CONFIG", config)
    monkeypatch.setattr(render_serve_config, "PATCH", tmp_path / "patch.yaml")
    monkeypatch.setattr(render_serve_config, "ROOT", tmp_path)
    assert render_serve_config.main(["--check"]) == 1  # missing
    assert render_serve_config.main([]) == 0
    assert render_serve_config.main(["--check"]) == 0
    (tmp_path / "patch.yaml").write_text(
        (tmp_path / "patch.yaml").read_text().replace("applications", "apps", 1)
    )
    assert render_serve_config.main(["--check"]) == 1


def _serve_http(config: dict[str, Any]) -> tuple[int, list[str]]:
    port = (config.get("http_options") or {}).get("port", 8000)
    return port, [(app.get("route_prefix") or "/").rstrip("/") + "/healthz" for app in config["applications"]]


def test_serve_workers_probe_healthz_and_the_head_does_not(rendered):
    """Start-up and readiness wait for the application's /healthz; liveness asks the node's Serve proxy only
    (/-/healthz), so an application failing everywhere takes workers out of the Service but restarts none."""
    port, health_paths = _serve_http(yaml.safe_load(render_serve_config.SERVE_CONFIG.read_text()))
    for path in PLATFORM.values():
        cluster = one(rendered[path], "RayService")["spec"]["rayClusterConfig"]
        for group in cluster["workerGroupSpecs"]:
            worker = group["template"]["spec"]["containers"][0]
            for probe in ("startupProbe", "readinessProbe"):
                assert worker[probe]["httpGet"]["path"] in health_paths, (probe, health_paths)
                assert worker[probe]["httpGet"]["port"] == port
            assert worker["livenessProbe"]["httpGet"] == {"path": "/-/healthz", "port": port}
        # KubeRay deploys the application only after the head is ready: a head probing it would never start
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert not {"readinessProbe", "livenessProbe", "startupProbe"} & set(head)


def _replicas(deployment: dict[str, Any]) -> tuple[int, int]:
    """(fewest, most) replicas a Serve deployment runs."""
    auto = deployment.get("autoscaling_config")
    if auto:
        return auto.get("min_replicas", 1), auto.get("max_replicas", 1)
    fixed = deployment.get("num_replicas", 1)
    return fixed, fixed


def test_serve_replicas_fit_the_scorer_cluster(rendered):
    """Each replica fits on a worker; the fewest replicas fit on the fewest workers (the service comes up
    without waiting on the autoscaler); the most replicas fit on the most workers (autoscaling never asks for a
    replica the cluster cannot place)."""
    config = yaml.safe_load(render_serve_config.SERVE_CONFIG.read_text())
    deployments = [d for app in config["applications"] for d in app.get("deployments") or []]
    for env, path in PLATFORM.items():
        groups = one(rendered[path], "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups]
        need = {"min": 0.0, "max": 0.0}
        for deployment in deployments:
            opts = deployment.get("ray_actor_options") or {}
            cpus, gpus = float(opts.get("num_cpus", 1)), float(opts.get("num_gpus", 0))
            assert any(
                cpu(lim["cpu"]) >= cpus and float(lim.get("nvidia.com/gpu", 0)) >= gpus for lim in limits
            ), f"{env}: no Serve worker group fits a {deployment['name']} replica ({cpus} CPU, {gpus} GPU)"
            fewest, most = _replicas(deployment)
            need["min"] += fewest * cpus
            need["max"] += most * cpus
        have_min = sum(g["minReplicas"] * cpu(lim["cpu"]) for g, lim in zip(groups, limits))
        assert need["min"] <= have_min, (
            f"{env}: the fewest replicas need {need['min']} CPUs, minReplicas give {have_min}"
        )
        have_max = sum(g["maxReplicas"] * cpu(lim["cpu"]) for g, lim in zip(groups, limits))
        assert need["max"] <= have_max, (
            f"{env}: the most replicas need {need['max']} CPUs, maxReplicas give {have_max}"
        )


def test_the_ingress_replicas_start_on_as_many_worker_pods(rendered):
    """Serve spreads a deployment's replicas over nodes (its default SPREAD strategy): with as many worker Pods
    as Ingress replicas from the start, each Ingress has a node of its own, and losing one node leaves another
    Ingress serving (bench/bench_cluster.py measures it)."""
    config = yaml.safe_load(render_serve_config.SERVE_CONFIG.read_text())
    deployments = {d["name"]: d for app in config["applications"] for d in app.get("deployments") or []}
    ingresses = _replicas(deployments["Ingress"])[0]
    assert ingresses >= 2
    for env, path in PLATFORM.items():
        groups = one(rendered[path], "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        assert sum(g["minReplicas"] for g in groups) >= ingresses, env


# ----------------------------------------------------------------------------------------------- training
def entrypoint(job: dict[str, Any]) -> tuple[Path, Path, list[tuple[str, str]]]:
    """(script, config, [(flag, value), ...]) of a RayJob's `python SCRIPT --config CONFIG [--flag VALUE ...]`."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[2] == "--config" and len(argv) % 2 == 0, argv
    flags = list(zip(argv[4::2], argv[5::2]))
    assert all(flag.startswith("--") for flag, _ in flags), argv
    return ROOT / argv[1], ROOT / argv[3], flags


def rayjob(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (job,) = [j for j in by_kind(objects, "RayJob") if j["metadata"]["name"] == name]
    return job


def test_rayjob_entrypoints_run_real_scripts_and_configs(rendered):
    for env, path in JOBS.items():
        for job in by_kind(rendered[path], "RayJob"):
            script, config, _ = entrypoint(job)
            assert script.is_file(), f"{env} {v.describe(job)}: {script} does not exist"
            assert "--config" in script.read_text(), f"{script.name} takes no --config"
            assert config.is_file(), f"{env} {v.describe(job)}: {config} does not exist"
            assert job["metadata"]["name"] == "train-" + script.stem.removeprefix("train_")
            # the relative paths resolve against the job's working_dir: the image's copy of this checkout
            runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
            assert in_repo(runtime_env["working_dir"]) == ROOT


def _on_shared_volume(path: str | Path) -> bool:
    return str(path).startswith(SHARED_MOUNT + "/")


def _reachable_from_the_cluster(source: str) -> bool:
    """Synthetic, a file on the shared volume, or a hub dataset name (not a path next to this checkout)."""
    if source == "synthetic" or _on_shared_volume(source):
        return True
    return not source.startswith((".", "/", "~")) and not re.search(r"\.(jsonl?|gz|parquet|csv)$", source)


def _fits(groups: list[dict[str, Any]], cpus: float, gpus: float) -> list[dict[str, Any]]:
    """The worker groups whose Pods hold a Ray worker of `cpus` CPUs and `gpus` GPUs."""
    limits = [(g, g["template"]["spec"]["containers"][0]["resources"]["limits"]) for g in groups]
    return [g for g, lim in limits if cpu(lim["cpu"]) >= cpus and lim.get("nvidia.com/gpu", 0) >= gpus]


def test_train_vrm_jobs_load_their_config_and_write_to_the_shared_volume(rendered):
    """train_vrm.py's own loader accepts config + overrides; outputs land on the volume every node shares."""
    from rewardprism.config import load_config
    from rewardprism.recipes.vrm import VrmConfig

    for env, path in JOBS.items():
        _, config_file, flags = entrypoint(rayjob(rendered[path], "train-vrm"))
        assert {flag for flag, _ in flags} <= {"--override"}, flags
        config = load_config(VrmConfig, config_file, [value for _, value in flags])
        assert _on_shared_volume(config.run_dir) and _on_shared_volume(config.export_dir), env
        assert _reachable_from_the_cluster(config.data.source), (env, config.data.source)
        assert config.ray.use_gpu is (env == "prod")
        # a lost worker Pod is retried from the latest checkpoint; a resubmitted job continues its run
        assert config.ray.max_failures >= 3 and config.ray.resume, env
        # each Ray Train worker fits on a Pod of a worker group, and all of them on those groups at their largest
        groups = one(rendered[PLATFORM[env]], "RayCluster")["spec"]["workerGroupSpecs"]
        fits = _fits(groups, config.ray.cpus_per_worker, 1 if config.ray.use_gpu else 0)
        assert sum(g["maxReplicas"] for g in fits) >= config.ray.num_workers, (
            f"{env}: no room for {config.ray}"
        )


def test_train_drm_jobs_load_their_config_and_write_to_the_shared_volume(rendered):
    """train_drm.py's own loader accepts config + overrides (`--override field=value`, YAML values)."""
    from rewardprism.config import load_config
    from rewardprism.recipes.drm import DrmConfig

    for env, path in JOBS.items():
        _, config_file, flags = entrypoint(rayjob(rendered[path], "train-drm"))
        assert {flag for flag, _ in flags} <= {"--override"}, flags
        config = load_config(DrmConfig, config_file, [value for _, value in flags])
        assert _on_shared_volume(config.output_dir), (env, config.output_dir)
        assert config.embeddings is None or _on_shared_volume(config.embeddings), (env, config.embeddings)
        assert _reachable_from_the_cluster(config.dataset), (env, config.dataset)
        groups = one(rendered[PLATFORM[env]], "RayCluster")["spec"]["workerGroupSpecs"]
        assert sum(g["maxReplicas"] for g in _fits(groups, 1, 0)) >= 1, (
            env
        )  # its embedding actors: 1 CPU each


def test_rayjobs_submit_to_the_training_cluster(rendered):
    for env in PLATFORM:
        cluster = one(rendered[PLATFORM[env]], "RayCluster")
        for job in by_kind(rendered[JOBS[env]], "RayJob"):
            assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
            assert job["metadata"]["namespace"] == cluster["metadata"]["namespace"]
            assert "suspend" not in job["spec"]  # KubeRay refuses suspend with a clusterSelector
            assert not job["spec"].get("shutdownAfterJobFinishes")  # it would delete the shared cluster


# ------------------------------------------------------------------------------------ migrations, secrets
def test_migration_job_runs_the_installed_upgrade(rendered):
    for path in PLATFORM.values():
        job = one(rendered[path], "Job")
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["rewardprism", "db", "upgrade"]  # migrations from the installed wheel
        assert in_repo(container["workingDir"]).is_dir()


def test_service_starts_only_after_the_migration(rendered):
    for path in PLATFORM.values():
        head = one(rendered[path], "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"][
            "spec"
        ]
        (init,) = head["initContainers"]
        assert init["command"][:2] == ["python", "k8s/wait_for_migrations.py"]
        assert (ROOT / init["command"][1]).is_file()


def test_wait_for_migrations_waits_for_head(tmp_path, monkeypatch, capsys):
    """The init container's script on a real (SQLite) database: refuses before the upgrade, passes after."""
    from rewardprism.store import migrate

    wait = _load(K8S / "wait_for_migrations.py", "rewardprism_k8s_wait_for_migrations")
    url = f"sqlite:///{tmp_path / 'rp.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    assert wait.main(["--timeout", "0"]) == 1
    assert "not at head" in capsys.readouterr().err
    migrate.upgrade(url)
    assert wait.main(["--timeout", "0"]) == 0
    assert f"at head {migrate.head_revision()}" in capsys.readouterr().out


SECRET_TEMPLATE = K8S / "secret.template.yaml"


def test_secret_template_has_placeholders_only_and_every_key_the_pods_read(crds, rendered):
    template = yaml.safe_load(SECRET_TEMPLATE.read_text())
    assert v.object_errors(template) == []
    values = template["stringData"]
    assert set(values) == {"DATABASE_URL", "REWARDPRISM_ADMIN_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD"}
    assert all("changeme" in value for value in values.values()), "the template holds only placeholders"
    refs, optional = set(), set()
    for objects in rendered.values():
        assert not by_kind(objects, "Secret"), "applying an overlay must never overwrite the real Secret"
        for _, _, container in (c for o in objects for c in v.iter_containers(o)):
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    (optional if ref.get("optional") else refs).add((ref["name"], ref["key"]))
    assert refs and refs <= {(template["metadata"]["name"], key) for key in values}, refs
    # an optional key (a placeholder value would be used as if real) is described in the template, commented out
    for name, key in optional:
        assert name == template["metadata"]["name"] and f"# {key}: " in SECRET_TEMPLATE.read_text(), key


# ----------------------------------------------------------------------------------- Pods: users, resources
UNITS = {
    "m": 1e-3,
    "": 1,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(value: str | float) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * UNITS[unit]


cpu = quantity


def test_every_pod_is_non_root_with_requests_and_limits(rendered):
    seen = 0
    for objects in rendered.values():
        for obj in objects:
            for where, pod, container in v.iter_containers(obj):
                seen += 1
                pod_sc, sc = pod.get("securityContext") or {}, container.get("securityContext") or {}
                assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser", 0) > 0, where
                assert sc.get("allowPrivilegeEscalation") is False and sc["capabilities"]["drop"] == [
                    "ALL"
                ], where
                resources = container.get("resources") or {}
                for key in ("cpu", "memory"):
                    request, limit = resources["requests"][key], resources["limits"][key]
                    assert quantity(request) <= quantity(limit), (where, key)
                tag = container["image"].rpartition(":")[2]
                assert ":" in container["image"] and tag != "latest", (
                    f"{where}: unpinned image {container['image']}"
                )
            for cluster in _ray_cluster_specs(obj):  # the autoscaler sidecar KubeRay adds to the head
                options = cluster["autoscalerOptions"]
                assert (
                    options["resources"]["limits"]
                    and options["securityContext"]["allowPrivilegeEscalation"] is False
                )
    assert seen >= 18  # every container of both environments, the RayJob submitters included


def test_ray_heads_schedule_no_work(rendered):
    for objects in rendered.values():
        for obj in objects:
            for cluster in _ray_cluster_specs(obj):
                assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


# ----------------------------------------------------------------------------------- versions and the image
def _dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S*)$", (K8S / "Dockerfile").read_text(), re.MULTILINE)
    assert match, f"k8s/Dockerfile has no ARG {name}="
    return match.group(1)


def test_versions_agree_between_project_image_and_manifests(rendered):
    ray = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert _dockerfile_arg("RAY_VERSION") == ray
    for objects in rendered.values():
        for obj in objects:
            for cluster in _ray_cluster_specs(obj):
                assert cluster["rayVersion"] == ray, v.describe(obj)
    torch = re.search(r"pip install torch==([0-9.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert _dockerfile_arg("TORCH_VERSION") == torch
    image_python = re.match(r"py3(\d+)", _dockerfile_arg("RAY_VARIANT"))  # e.g. py311-cpu
    least = re.search(r'requires-python = ">=3\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert image_python and least and int(image_python.group(1)) >= int(least.group(1)), \
        "the image's Python is older than pyproject.toml's requires-python"


def test_dockerfile_copies_files_that_exist_and_puts_the_tree_where_manifests_expect():
    text = (K8S / "Dockerfile").read_text()
    assert re.search(rf"^WORKDIR {IMAGE_TREE}$", text, re.MULTILINE)
    for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE):
        sources = [s for s in shlex.split(line) if not s.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"k8s/Dockerfile copies {source}, which is not in the checkout"
    ignored = (K8S / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
