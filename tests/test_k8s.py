"""deploy/k8s against the Kubernetes schemas and docker-compose.yml, its commands against the
real CLIs.

The kustomization is built by a small builder here that does what kustomize does with the
fields deploy/k8s uses, and refuses any other, so the checks need neither kubectl nor a
cluster; where kubectl is installed, ``kubectl kustomize`` builds it too and must agree.
Nothing here shows that a cluster runs the manifests: that takes a cluster with GPUs.
"""

from __future__ import annotations

import ast
import base64
import copy
import inspect
import json
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import click
import kubernetes_validate
import optuna_dashboard
import pytest
import yaml
from mlflow.cli import cli as mlflow_cli
from mlflow.server.security_utils import is_allowed_host_header, is_health_endpoint
from optuna_dashboard import _cli as dashboard_cli

from mapnet_tune.cli import main
from tests.conftest import interpolate_compose, parse_command

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)["services"]
# The secrets docker-compose.yml refuses to start without.
SECRETS = sorted(set(re.findall(r"\$\{(\w+):\?", COMPOSE_TEXT)))
SECRET_NAME = "mapnet-tune-secrets"
# The oldest release with elastic Indexed Jobs as stable (docs/deploy.md scales the workers
# with them) and the newest whose schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
# docker-compose.yml's services and the pod templates that play their part.
COMPONENTS = {
    "postgres": ("StatefulSet", "postgres"),
    "mlflow": ("Deployment", "mlflow"),
    "optuna-dashboard": ("Deployment", "optuna-dashboard"),
    "worker": ("Job", "workers"),
}


def _env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as kustomize's ``envs`` reads them (comments and blanks skipped)."""
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            assert "=" in line, f"{path}: {line!r} takes its value from the environment"
            key, value = line.split("=", 1)
            pairs[key] = value
    return pairs


def _pod_templates(obj: dict) -> list[dict]:
    template = obj.get("spec", {}).get("template")
    if template is None:
        return []
    assert obj["kind"] in ("Deployment", "StatefulSet", "Job"), f"builder: {obj['kind']}"
    return [template]


def _containers(obj: dict) -> list[dict]:
    return [
        c
        for template in _pod_templates(obj)
        for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]
    ]


def build(root: Path) -> list[dict]:
    """The objects ``kubectl kustomize root`` makes, for the fields deploy/k8s uses."""
    spec = yaml.safe_load((root / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "labels", "resources", "generatorOptions"}
    known |= {"configMapGenerator", "secretGenerator", "images"}
    assert set(spec) <= known, f"the builder does not implement {sorted(set(spec) - known)}"
    # Generated names then carry no content hash, and references need no rewriting.
    assert spec["generatorOptions"] == {"disableNameSuffixHash": True}
    objects = []
    for name in spec["resources"]:
        assert (root / name).is_file(), f"the builder reads files only, not {name}"
        objects += [doc for doc in yaml.safe_load_all((root / name).read_text()) if doc]
    for gen in spec.get("configMapGenerator", []):
        assert set(gen) <= {"name", "files"}
        data = {}
        for item in gen["files"]:
            key, _, path = item.rpartition("=")
            data[key or Path(path).name] = (root / path).read_text()
        meta = {"name": gen["name"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for gen in spec.get("secretGenerator", []):
        assert set(gen) <= {"name", "envs"}
        pairs = {k: v for path in gen["envs"] for k, v in _env_file(root / path).items()}
        data = {k: base64.b64encode(v.encode()).decode() for k, v in pairs.items()}
        meta = {"name": gen["name"]}
        objects.append(
            {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "data": data}
        )
    for obj in objects:
        if obj["kind"] == "Namespace":
            obj["metadata"]["name"] = spec["namespace"]
        else:
            obj["metadata"]["namespace"] = spec["namespace"]
        for entry in spec.get("labels", []):
            assert set(entry) <= {"pairs", "includeSelectors", "includeTemplates"}
            assert not entry.get("includeSelectors"), "the builder leaves selectors alone"
            metas = [obj["metadata"]]
            if entry.get("includeTemplates"):
                metas += [t["metadata"] for t in _pod_templates(obj)]
                metas += [
                    c["metadata"] for c in obj.get("spec", {}).get("volumeClaimTemplates", [])
                ]
            for meta in metas:
                meta.setdefault("labels", {}).update(entry["pairs"])
        for container in _containers(obj):
            for rule in spec.get("images", []):
                assert set(rule) <= {"name", "newName", "newTag"}
                name, _, tag = container["image"].partition(":")
                if name == rule["name"]:
                    tag = str(rule.get("newTag", tag))
                    container["image"] = rule.get("newName", name) + (f":{tag}" if tag else "")
    return objects


TEST_SECRETS = {
    key: f"k8stest{secrets.token_hex(8)}" for key in _env_file(K8S / "secrets.env.example")
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of deploy/k8s (never its real secrets.env) and docker/, with test secrets."""
    root = tmp_path_factory.mktemp("repo")
    k8s = root / "deploy" / "k8s"
    shutil.copytree(K8S, k8s, ignore=shutil.ignore_patterns("secrets.env"))
    shutil.copytree(ROOT / "docker", root / "docker")
    (k8s / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in TEST_SECRETS.items()))
    return k8s


@pytest.fixture(scope="module")
def objects(tree) -> list[dict]:
    return build(tree)


def _find(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def _pod(objects: list[dict], service: str) -> dict:
    """The pod spec that plays the part of a docker-compose.yml service."""
    return _find(objects, *COMPONENTS[service])["spec"]["template"]["spec"]


def _resolved_env(container: dict) -> dict[str, str]:
    """Each variable's value as the pod sees it: a secret key as ``<secret KEY>``, and
    ``$(VAR)`` expanded as Kubernetes does, from the variables defined before it."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == SECRET_NAME and not ref.get("optional"), var
            env[var["name"]] = f"<secret {ref['key']}>"
        else:
            env[var["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"]
            )
    return env


def _duration(text: str) -> int:
    """Compose's '2m', '1m30s' or '90s' in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    assert parts and text, text
    h, m, s = (int(p or 0) for p in parts.groups())
    return h * 3600 + m * 60 + s


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_follows_the_kubernetes_schema(objects, version):
    errors = []
    for obj in objects:
        try:
            # Strict: an unknown (misspelt, misplaced) field is an error.
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(map(str, e.path))
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {e.message}")
    assert not errors, "\n".join(errors)
    broken = copy.deepcopy(_find(objects, "Job", "workers"))
    broken["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl; the builder stands in")
def test_kubectl_kustomize_builds_the_same_objects(tree, objects):
    def kustomize(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["kubectl", "kustomize", *flags, str(tree)], capture_output=True, text=True
        )

    done = kustomize("--load-restrictor", "LoadRestrictionsNone")
    assert done.returncode == 0, done.stderr
    built = [doc for doc in yaml.safe_load_all(done.stdout) if doc]

    def key(obj: dict) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    assert {key(o): o for o in built} == {key(o): o for o in objects}
    # The flag docs/deploy.md passes is needed: the init script lives outside deploy/k8s.
    refused = kustomize()
    assert refused.returncode != 0 and "postgres-init.sh" in refused.stderr


def test_workers_are_an_indexed_job_with_one_gpu_per_pod(objects):
    job = _find(objects, "Job", "workers")["spec"]
    pod = job["template"]["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] >= 1, "one pod per worker, all at once"
    assert pod["restartPolicy"] == "OnFailure"
    # Restarts of all pods add up against backoffLimit; compose restarts each worker 3 times.
    per_worker = int(COMPOSE["worker"]["restart"].removeprefix("on-failure:"))
    assert job["backoffLimit"] >= per_worker * job["completions"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["resources"].get("requests", {}).get("nvidia.com/gpu", 1) == 1
    # Time to re-queue the running trial on SIGTERM, as compose gives it.
    assert pod["terminationGracePeriodSeconds"] >= _duration(COMPOSE["worker"]["stop_grace_period"])
    gpu_users = [c["name"] for o in objects for c in _containers(o) if "nvidia.com/gpu" in str(c)]
    assert gpu_users == ["worker"], "only the worker takes a GPU"


@pytest.mark.parametrize("service", COMPONENTS)
def test_each_part_gets_the_environment_of_its_compose_service(objects, service):
    container = _pod(objects, service)["containers"][0]
    env = _resolved_env(container)
    placeholders = {key: f"<secret {key}>" for key in SECRETS}
    for name, value in COMPOSE[service].get("environment", {}).items():
        assert name in env, f"{service}: {name} is not set"
        assert env[name] == interpolate_compose(str(value), placeholders), (service, name)


def test_secrets_reach_the_pods_only_from_the_secret(objects):
    for obj in objects:
        for container in _containers(obj):
            where = f"{obj['kind']}/{obj['metadata']['name']}/{container['name']}"
            for source in container.get("envFrom", []):
                assert source == {"secretRef": {"name": SECRET_NAME}}, where
            for name, value in _resolved_env(container).items():
                if any(word in name for word in ("PASSWORD", "SECRET")):
                    assert re.fullmatch(r"<secret \w+>", value), (where, name)
                credentials = re.search(r"://[^/:@]+:([^@]*)@", value)
                if credentials:
                    assert re.fullmatch(r"<secret \w+>", credentials.group(1)), (where, name)
            refs = re.findall(r"<secret (\w+)>", json.dumps(_resolved_env(container)))
            assert set(refs) <= set(TEST_SECRETS), (where, refs)
    # The values themselves are in the Secret and nowhere else.
    secret = _find(objects, "Secret", SECRET_NAME)
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == TEST_SECRETS
    text = json.dumps([o for o in objects if o is not secret])
    assert not [key for key, value in TEST_SECRETS.items() if value in text]


def test_the_real_secrets_file_is_ignored_and_the_example_has_the_compose_keys():
    example = _env_file(K8S / "secrets.env.example")
    assert sorted(example) == SECRETS and not any(example.values())
    (generator,) = KUSTOMIZATION["secretGenerator"]
    assert generator == {"name": SECRET_NAME, "envs": ["secrets.env"]}
    assert "deploy/k8s/secrets.env" in (ROOT / ".gitignore").read_text().splitlines()
    if shutil.which("git") and (ROOT / ".git").exists():

        def ignored(path: str) -> bool:
            return (
                subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path]).returncode == 0
            )

        assert ignored("deploy/k8s/secrets.env")
        assert not ignored("deploy/k8s/secrets.env.example")


class _DashboardParsed(Exception):
    def __init__(self, config):
        self.config = config


def _parse_dashboard(args: list[str]):
    """The configuration optuna-dashboard's own command line makes of ``args``."""
    real = dashboard_cli.DashboardConfig.build_from_sources

    def stop(parsed, toml):
        raise _DashboardParsed(real(parsed, toml))

    with (
        mock.patch.object(dashboard_cli.DashboardConfig, "build_from_sources", stop),
        mock.patch.object(sys, "argv", ["optuna-dashboard", *args]),
        pytest.raises(_DashboardParsed) as parsed,
    ):
        dashboard_cli.main()
    return parsed.value.config


def _entrypoints() -> dict[str, list[str]]:
    """What runs in a container that sets no command, by image (before ``images:``)."""
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert entrypoint and json.loads(entrypoint.group(1)) == ["mapnet-tune"]
    script = (ROOT / "docker" / "mlflow-entrypoint.sh").read_text()
    assert 'exec mlflow server "$@"' in script
    return {"mapnet-tune": ["mapnet-tune"], "mapnet-tune-mlflow": ["mlflow", "server"]}


def _parse_command_line(argv: list[str]) -> tuple[str, object]:
    """Parse one container's command line with the real CLI of its program."""
    program = argv[0]
    if program == "mapnet-tune":
        return program, parse_command(main.commands[argv[1]], argv[1], argv[2:])
    if program == "mlflow":
        return program, parse_command(mlflow_cli.commands[argv[1]], argv[1], argv[2:])
    if program == "optuna-dashboard":
        return program, _parse_dashboard(argv[1:])
    if argv[:2] == ["python", "-c"] and len(argv) == 3:
        return program, compile(argv[2], "<container>", "exec")
    if argv[:2] == ["sh", "-c"] and len(argv) == 3:
        done = subprocess.run(["sh", "-n", "-c", argv[2]], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return program, argv[2]
    if argv == ["sleep", "infinity"]:
        return program, None
    raise AssertionError(f"no real command line known for {argv}: teach tests/test_k8s.py")


def _command_lines(objects: list[dict]) -> dict[str, tuple[str, object]]:
    """container name -> (program, parsed) for every container that runs a known program."""
    images = {rule["newName"]: rule["name"] for rule in KUSTOMIZATION["images"]}
    entrypoints = _entrypoints()
    found = {}
    for obj in objects:
        for c in _containers(obj):
            image = images.get(c["image"].partition(":")[0], c["image"].partition(":")[0])
            if "command" in c:
                argv = c["command"] + c.get("args", [])
            elif image in entrypoints:
                argv = entrypoints[image] + c.get("args", [])
            else:
                assert "args" not in c, f"{c['name']}: arguments for {image}'s own command"
                continue
            found[f"{obj['metadata']['name']}/{c['name']}"] = _parse_command_line(argv)
    return found


def test_every_command_line_parses_with_its_real_cli(objects):
    found = _command_lines(objects)
    assert {"workers/worker", "mlflow/mlflow", "dataset/dataset"} <= set(found)
    # The checks have teeth: a mistake fails each of them.
    for argv, error in (
        (["mapnet-tune", "search", "--dataset", "drive", "--trails", "3"], click.UsageError),
        (["mlflow", "server", "--app-name", "basic-auth", "--serve-artifact"], click.UsageError),
        (["optuna-dashboard", "--prot", "8080", "sqlite:///x.db"], SystemExit),
        (["python", "-c", "import time,"], SyntaxError),
        (["sh", "-c", "until true; do sleep 1"], AssertionError),
        (["optuna-dashbaord", "sqlite:///x.db"], AssertionError),
    ):
        with pytest.raises(error):
            _parse_command_line(argv)
    assert _parse_dashboard(["--port", "8081", "sqlite:///x.db"]).port == 8081


def test_workers_run_the_compose_search_command_one_process_each(objects, monkeypatch):
    worker = _pod(objects, "worker")["containers"][0]
    assert "command" not in worker, "the image's entrypoint, mapnet-tune, as in compose"
    literal = {v["name"]: v["value"] for v in worker["env"] if "value" in v}
    for name, value in literal.items():
        monkeypatch.setenv(name, value)
    params = _command_lines(objects)["workers/worker"][1]
    assert params["gpus"] is None and params["trials_per_gpu"] is None, "one GPU per pod"
    # The search command reads the worker's crash-recovery settings from the environment.
    assert params["heartbeat_interval"] == int(literal["MAPNET_TUNE_HEARTBEAT_S"])
    assert params["grace_period"] == int(literal["MAPNET_TUNE_GRACE_S"])
    args = [interpolate_compose(str(a), {}) for a in COMPOSE["worker"]["command"]]
    compose = parse_command(main.commands[args[0]], args[0], args[1:])
    launcher = ("gpus", "trials_per_gpu")
    assert {k: v for k, v in params.items() if k not in launcher} == {
        k: v for k, v in compose.items() if k not in launcher
    }
    init = _pod(objects, "worker")["initContainers"][0]["command"][2]
    assert f"{literal['MLFLOW_TRACKING_URI']}/health" in init, "waits for the tracking server"


def _auth_unprotected_prefixes() -> tuple[str, ...]:
    """mlflow.server.auth's unprotected paths, read from its source: importing the module
    needs the `auth` extra, which the server image has and this environment need not."""
    source = Path(find_spec("mlflow.server.auth").origin).read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == "_UNPROTECTED_PATH_PREFIXES" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("mlflow.server.auth has no _UNPROTECTED_PATH_PREFIXES any more")


def test_mlflow_runs_the_compose_server_command_and_answers_its_clients(objects):
    pod = _pod(objects, "mlflow")
    (server,) = pod["containers"]
    params = _command_lines(objects)["mlflow/mlflow"][1]
    args = [interpolate_compose(str(a), {}) for a in COMPOSE["mlflow"]["command"]]
    compose = parse_command(mlflow_cli.commands["server"], "server", args)
    assert params["app_name"] == "basic-auth" and params["serve_artifacts"]
    assert {k: v for k, v in params.items() if k != "allowed_hosts"} == {
        k: v for k, v in compose.items() if k != "allowed_hosts"
    }
    allowed = params["allowed_hosts"].split(",")
    worker_env = _resolved_env(_pod(objects, "worker")["containers"][0])
    port = next(p["containerPort"] for p in server["ports"] if p["name"] == "http")
    assert port == params["port"]
    # The workers' Host header and `kubectl port-forward`'s pass; another name does not.
    for host in (urlsplit(worker_env["MLFLOW_TRACKING_URI"]).netloc, "localhost:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert is_allowed_host_header(allowed, "127.0.0.1:5000")
    assert not is_allowed_host_header(allowed, "evil.example:5000")
    probes = [server[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")]
    for probe in probes:
        path = probe["httpGet"]["path"]
        assert probe["httpGet"]["port"] in ("http", port)
        # The kubelet sends neither credentials nor an allowed Host header.
        assert is_health_endpoint(path) and path.startswith(_auth_unprotected_prefixes())
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    volume = mounts[_resolved_env(server)["MLFLOW_ARTIFACTS_DESTINATION"]]
    claim = next(v for v in pod["volumes"] if v["name"] == volume)["persistentVolumeClaim"]
    _find(objects, "PersistentVolumeClaim", claim["claimName"])


def test_the_dashboard_runs_its_images_command_behind_a_cluster_ip(objects):
    (dashboard,) = _pod(objects, "optuna-dashboard")["containers"]
    assert "command" not in dashboard and "args" not in dashboard, "password off the argv"
    text = (ROOT / "docker" / "dashboard.Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))
    assert cmd[:2] == ["python", "-c"]
    (call,) = [
        node
        for node in ast.walk(ast.parse(cmd[2]))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "run_server"
    ]
    bound = inspect.signature(optuna_dashboard.run_server).bind(
        *call.args, **{k.arg: k.value for k in call.keywords}
    )
    storage = bound.arguments["storage"]
    assert ast.literal_eval(storage.slice) in _resolved_env(dashboard), "reads OPTUNA_STORAGE"
    port = ast.literal_eval(bound.arguments["port"])
    assert ast.literal_eval(bound.arguments["host"]) == "0.0.0.0"
    assert [p["containerPort"] for p in dashboard["ports"]] == [port]
    # Nothing is exposed beyond the cluster: no login on the dashboard, and `kubectl
    # port-forward` reaches both servers.
    for obj in objects:
        assert obj["kind"] not in ("Ingress", "Route", "Gateway"), obj["metadata"]["name"]
        if obj["kind"] == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", obj["metadata"]["name"]


def test_services_and_urls_reach_the_right_pods(objects):
    services = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "Service"}
    templates = {o["metadata"]["name"]: o for o in objects if _pod_templates(o)}
    for name, spec in services.items():
        matches = [
            o
            for o in templates.values()
            if spec["selector"].items() <= o["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, f"service {name} selects {len(matches)} workloads"
        ports = [p for c in _containers(matches[0]) for p in c.get("ports", [])]
        for port in spec["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(target in (p.get("name"), p["containerPort"]) for p in ports), (name, port)
    for obj in templates.values():
        selector = obj["spec"].get("selector", {}).get("matchLabels", {})
        assert selector.items() <= obj["spec"]["template"]["metadata"]["labels"].items()
    statefulset = _find(objects, "StatefulSet", "postgres")["spec"]
    assert services[statefulset["serviceName"]].get("clusterIP") == "None", "headless"
    # Every server a container talks to (URLs, `pg_isready -h HOST -p PORT`) is a service.
    text = json.dumps([c for o in objects for c in _containers(o)])
    targets = re.findall(r"(?:://(?:[^/@\s\"]*@)?|-h )([a-z][\w-]*)(?::| -p )(\d+)", text)
    assert {host for host, _ in targets} >= {"postgres", "mlflow"}
    for host, port in targets:
        if host not in ("localhost",):
            assert int(port) in [p["port"] for p in services[host]["ports"]], (host, port)


def test_volumes_hold_what_compose_volumes_hold(objects):
    claims = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}
    for obj in objects:
        for template in _pod_templates(obj):
            for volume in template["spec"].get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims, volume
                if "configMap" in volume:
                    _find(objects, "ConfigMap", volume["configMap"]["name"])
    # PostgreSQL runs compose's init script, the same file, as an executable.
    init = _find(objects, "ConfigMap", "postgres-init")["data"]
    (mount,) = [v for v in COMPOSE["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v]
    source, target = mount.split(":")[:2]
    assert init == {Path(target).name: (ROOT / source).read_text()}
    pod = _pod(objects, "postgres")
    (postgres,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in postgres["volumeMounts"]}
    assert mounts["init"] == str(Path(target).parent)
    (volume,) = [v for v in pod["volumes"] if v["name"] == "init"]
    assert volume["configMap"]["defaultMode"] & 0o555 == 0o555
    pgdata = _resolved_env(postgres)["PGDATA"]
    assert pgdata.startswith(mounts["data"] + "/"), "initdb needs an empty folder"
    # The workers see compose's /cache (read-write, the image's MAPNET_TUNE_CACHE) and /data
    # (read-only) on volumes every node can mount, and run as the image's user.
    dockerfile = (ROOT / "Dockerfile").read_text()
    cache = re.search(r"MAPNET_TUNE_CACHE=(\S+)", dockerfile).group(1)
    uid = int(re.search(r"useradd .*--uid (\d+)", dockerfile).group(1))
    compose_targets = {
        interpolate_compose(v, {}).split(":")[1] for v in COMPOSE["worker"]["volumes"]
    }
    for name in ("workers", "dataset"):
        pod = _find(objects, "Job" if name == "workers" else "Deployment", name)
        pod = pod["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert set(mounts) == compose_targets | {cache}
        assert not mounts[cache].get("readOnly")
        assert bool(mounts["/data"].get("readOnly")) == (name == "workers")
        for mount in mounts.values():
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            claim = claims[volume["persistentVolumeClaim"]["claimName"]]
            assert claim["spec"]["accessModes"] == ["ReadWriteMany"], claim["metadata"]["name"]
        context = pod["securityContext"]
        assert context["runAsUser"] == context["fsGroup"] == uid, "the cache is writable"


def _kubernetes_section() -> str:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    assert "\n## Kubernetes\n" in doc
    return doc.split("\n## Kubernetes\n", 1)[1].split("\n## ", 1)[0]


def _shell_lines() -> list[str]:
    """Commands in the doc's Kubernetes section and in the manifests' comments."""
    lines = [line[4:] for line in _kubernetes_section().splitlines() if line.startswith("    ")]
    for path in sorted(K8S.glob("*.yaml")):
        lines += [m.group(1) for m in re.finditer(r"^\s*#   (\S.*)$", path.read_text(), re.M)]
    return lines


KINDS = {
    "deployment": "Deployment",
    "statefulset": "StatefulSet",
    "job": "Job",
    "svc": "Service",
    "service": "Service",
    "pvc": "PersistentVolumeClaim",
    "secret": "Secret",
    "configmap": "ConfigMap",
}


def test_documented_commands_name_real_objects_and_options(objects):
    lines = _shell_lines()
    kubectl = [shlex.split(line.split(" #", 1)[0]) for line in lines if "kubectl" in line]
    assert any("port-forward" in tokens for tokens in kubectl)
    labels = {
        f"{key}={value}"
        for obj in objects
        for template in _pod_templates(obj)
        for key, value in template["metadata"]["labels"].items()
    }
    for tokens in kubectl:
        for i, token in enumerate(tokens):
            if token in ("-n", "--namespace") or tokens[i - 1 : i + 1] == ["delete", "namespace"]:
                assert tokens[i + 1] == KUSTOMIZATION["namespace"], tokens
            if token.startswith("--namespace="):
                assert token.partition("=")[2] == KUSTOMIZATION["namespace"], tokens
            if token == "-l":
                # The manifests' own pod labels, or those the Job controller adds.
                selector = tokens[i + 1]
                assert selector in labels or selector.startswith("batch.kubernetes.io/"), tokens
            kind, _, name = token.partition("/")
            if kind in KINDS and name:
                found = _find(objects, KINDS[kind], name)
                if "port-forward" in tokens:
                    remote = int(tokens[i + 1].split(":")[-1])
                    assert remote in [p["port"] for p in found["spec"]["ports"]], tokens
        if "kustomize" in tokens:
            assert tokens[tokens.index("kustomize") + 1 :][:3] == [
                "--load-restrictor",
                "LoadRestrictionsNone",
                "deploy/k8s",
            ], tokens
    # mapnet-tune commands in the doc are parsed by tests/test_compose.py; those in the
    # manifests' comments here.
    for line in lines:
        tokens = shlex.split(line.split(" #", 1)[0])
        for i, token in enumerate(tokens[:-1]):
            if token == "mapnet-tune" and tokens[i - 1] not in ("-n", "--namespace", "namespace"):
                parse_command(main.commands[tokens[i + 1]], tokens[i + 1], tokens[i + 2 :])
                break
