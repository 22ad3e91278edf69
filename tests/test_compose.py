"""docker-compose.yml against the Compose specification, its commands against the real CLIs.

The schema is the Compose specification's own, as vendored by check-jsonschema, so the check
needs neither Docker nor a network; ``docker compose config`` runs too where Docker has it.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml
from mlflow.cli import cli as mlflow_cli

from mapnet_tune.cli import main
from tests.conftest import interpolate_compose, parse_command

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SECRETS = (
    "POSTGRES_PASSWORD",
    "OPTUNA_DB_PASSWORD",
    "MLFLOW_DB_PASSWORD",
    "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_SECRET_KEY",
)


def test_compose_file_follows_the_compose_spec():
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(COMPOSE)
    ]
    assert not errors, "\n".join(errors)
    # The schema has teeth: a misspelt key is an error.
    broken = copy.deepcopy(COMPOSE)
    broken["services"]["worker"]["helthcheck"] = {}
    assert list(validator.iter_errors(broken))


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="docker has no compose plugin here; the schema check stands in",
)
def test_docker_compose_config_accepts_the_file(tmp_path):
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{key}=x{i}\n" for i, key in enumerate(SECRETS)))
    done = subprocess.run(
        [
            "docker",
            "compose",
            "-f",
            str(ROOT / "docker-compose.yml"),
            "--env-file",
            str(env_file),
            "config",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_worker_runs_the_real_search_command():
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert entrypoint and json.loads(entrypoint.group(1)) == ["mapnet-tune"]
    args = [interpolate_compose(str(a), {}) for a in SERVICES["worker"]["command"]]
    params = parse_command(main.commands[args[0]], args[0], args[1:])
    assert params["gpus"] is not None, "one worker process per GPU slot"
    env = SERVICES["worker"]["environment"]
    assert env["MAPNET_TUNE_STORAGE"].startswith("postgresql+psycopg2://")
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_mlflow_server_runs_with_basic_auth_and_real_options():
    script = (ROOT / "docker" / "mlflow-entrypoint.sh").read_text()
    assert 'exec mlflow server "$@"' in script
    dockerfile = (ROOT / "docker" / "mlflow.Dockerfile").read_text()
    assert "FROM ghcr.io/mlflow/mlflow:v3.17.2" in dockerfile
    assert "psycopg2-binary" in dockerfile and "boto3" in dockerfile
    service = SERVICES["mlflow"]
    args = [interpolate_compose(str(a), {}) for a in service["command"]]
    params = parse_command(mlflow_cli.commands["server"], "server", args)
    assert params["app_name"] == "basic-auth"
    allowed = params["allowed_hosts"].split(",")
    assert {"mlflow", "mlflow:5000", "localhost"} <= set(allowed)
    assert service["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")


def test_ports_stay_local_and_secrets_come_from_env():
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert interpolate_compose(port, {}).startswith("127.0.0.1:"), (name, port)
        for key, value in service.get("environment", {}).items():
            value = str(value)
            if any(word in key for word in ("PASSWORD", "SECRET")):
                assert value.startswith("${"), (name, key)
            credentials = re.search(r"://[^/:@]+:([^@]*)@", value)
            if credentials:
                assert credentials.group(1).startswith("${"), (name, key)
    # Without .env the compose file refuses to start rather than run with empty passwords.
    for key in SECRETS:
        with pytest.raises(KeyError, match=key):
            interpolate_compose(
                (ROOT / "docker-compose.yml").read_text(), {k: "x" for k in SECRETS if k != key}
            )
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert all(example[key] == "" for key in SECRETS)
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def _doc_commands() -> list[tuple[str, list[str]]]:
    """(subcommand, arguments) of every mapnet-tune command in docs/deploy.md's code blocks."""
    found = []
    for line in (ROOT / "docs" / "deploy.md").read_text().splitlines():
        if not line.startswith("    "):
            continue
        tokens = shlex.split(line.split("#", 1)[0])
        for i, token in enumerate(tokens):
            # `mapnet-tune CMD`, the worker image `mapnet-tune:TAG CMD`, or
            # `docker compose run ... worker CMD`.
            if (
                token.split(":")[0] == "mapnet-tune" or token == "worker" and "run" in tokens[:i]
            ) and i + 1 < len(tokens):
                found.append((tokens[i + 1], tokens[i + 2 :]))
                break
    return found


def test_deploy_doc_commands_are_real():
    commands = _doc_commands()
    assert {name for name, _ in commands} >= {"search", "prepare"}
    for name, args in commands:
        assert name in main.commands, f"mapnet-tune {name} does not exist"
        parse_command(main.commands[name], name, args)
