"""The MLflow model registry: logged models, versions, aliases and ``models:/`` URIs."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np

from mapnet_tune.errors import UserError, redact_url
from mapnet_tune.names import BEST_RUN_TAG, DATASET_TAG, model_name
from mapnet_tune.tracking.links import DEFAULT_UI, model_url, run_url, runs_url, ui_base
from mapnet_tune.tracking.runs import RunTracker, quiet


class Tracker(RunTracker):
    """A study's view of one MLflow tracking store: its runs and its model registry.

    Args:
        tracking_uri: An ``http(s)://`` server or a database URI; see
            :func:`resolve_tracking_uri`.
        tolerate_outages: See :class:`RunTracker`.
    """

    def log_served_model(
        self,
        run_id: str,
        model_folder: Path,
        code_folder: Path,
        input_example: np.ndarray,
        metadata: Mapping[str, Any],
        pip_requirements: list[str],
        step: int = 0,
    ) -> tuple[str, str]:
        """Log a model folder as an MLflow pyfunc model under the run.

        The model's ``loader_module`` is :mod:`mapnet_tune.tracking.pyfunc`; ``code_folder``
        (the package's prediction code) travels with it, so it loads and serves where
        mapnet-tune is not installed. It holds source, JSON and tensors, no serialised objects.

        Args:
            run_id: The run that produced the model.
            model_folder: ``model.json`` and ``weights.safetensors``
                (:func:`mapnet_tune.predictor.save_folder`).
            code_folder: The copy of the package to carry
                (:func:`mapnet_tune.serving.served_code`).
            input_example: A small raw image, as a user would send it.
            metadata: The model card, shown on the logged model's page.
            pip_requirements: What the model needs from the package index.
            step: MLflow links the run's metrics at this step to the logged model.

        Returns:
            (model URI, logged model id).
        """
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        # Images come as (H, W) or (H, W, C) arrays, batches of any sizes, or file bytes:
        # MLflow checks a tensor's rank, and the only spec that admits them all is a 1-D
        # object tensor whose items are images. The shell checks each image itself.
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(object), (-1,))]),
            outputs=Schema(
                [
                    TensorSpec(np.dtype(np.float32), (-1, -1), "probability"),
                    TensorSpec(np.dtype(np.uint8), (-1, -1), "mask"),
                ]
            ),
        )
        with self._global_store(), quiet("mlflow.pyfunc"), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                loader_module="mapnet_tune.tracking.pyfunc",
                data_path=str(model_folder),
                code_paths=[str(code_folder)],
                signature=signature,
                input_example=input_example,
                pip_requirements=pip_requirements,
                metadata=dict(metadata),
                step=step,
            )
        return info.model_uri, info.model_id

    def load_predictor(self, uri: str) -> Any:
        """The :class:`~mapnet_tune.predictor.Predictor` of a registered pyfunc model.

        It is loaded the way ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` load it.
        """
        with self._global_store(), quiet("mlflow.pyfunc"):
            return mlflow.pyfunc.load_model(uri).get_raw_model()

    @contextlib.contextmanager
    def _global_store(self) -> Iterator[None]:
        """Point MLflow's process-wide tracking URI at this store for a block.

        ``log_model`` logs to the global "active run", and registering a logged model looks
        it up through the global URI. Setting it also writes ``$MLFLOW_TRACKING_URI``, so
        both are put back afterwards: later Trackers resolve their store as before.
        """
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(None)  # clears the global and the variable
            if previous is not None:
                os.environ["MLFLOW_TRACKING_URI"] = previous

    def register_version(
        self, name: str, model_uri: str, model_id: str, run_id: str, tags: Mapping[str, Any]
    ) -> str:
        """Register a logged model as a new version of ``name`` (created if missing).

        Returns:
            The new version number.
        """
        try:
            self.client.get_registered_model(name)
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            self.client.create_registered_model(name, tags={"mapnet_tune.kind": "mapnet"})
        with self._global_store():
            version = self.client.create_model_version(
                name,
                model_uri,
                run_id=run_id,
                model_id=model_id,
                tags={k: str(v) for k, v in tags.items()},
            )
        return str(version.version)

    def set_version_tags(self, name: str, version: str, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) tags of a model version."""
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, str(value))

    def set_version_description(self, name: str, version: str, text: str) -> None:
        """The Markdown a model version's page shows first."""
        self.client.update_model_version(name, version, description=text)

    def set_model_description(self, name: str, text: str) -> None:
        """The Markdown a registered model's page shows first."""
        self.client.update_registered_model(name, description=text)

    def delete_version(self, name: str, version: str) -> None:
        """Remove a model version (and with it any alias pointing at it)."""
        self.client.delete_model_version(name, version)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``alias`` of registered model ``name`` at ``version``."""
        self.client.set_registered_model_alias(name, alias, version)

    def versions(self, name: str) -> list[ModelVersionInfo]:
        """Every version of a registered model, oldest first; empty when it does not exist."""
        found = self.client.search_model_versions(f"name='{name}'")
        aliases = self._aliases(name) if found else {}
        return sorted((_version_info(v, aliases) for v in found), key=lambda v: int(v.version))

    def version_by_alias(self, name: str, alias: str) -> ModelVersionInfo | None:
        """The version an alias points at, or None when the model or alias does not exist."""
        version = self._aliases(name).get(alias)
        return None if version is None else self.model_version(name, version)

    def model_version(self, name: str, version: str) -> ModelVersionInfo:
        """One version of a registered model."""
        return _version_info(self.client.get_model_version(name, version), self._aliases(name))

    def resolve_model(self, uri: str) -> ModelVersionInfo:
        """The version a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI names.

        Raises:
            UserError: For a malformed URI, or an unknown model, alias or version (the message
                lists what exists).
        """
        name, alias, version = parse_model_uri(uri)
        names = [m.name for m in self.client.search_registered_models(max_results=1000)]
        if name not in names:
            raise UserError(
                f"no registered model '{name}' in {redact_url(self.uri)}; "
                f"registered models: {', '.join(sorted(names)) or '(none)'}; "
                f"run `mapnet-tune retrain-best` or pass --tracking-uri"
            )
        if alias is not None:
            aliases = self._aliases(name)
            if alias not in aliases:
                listed = ", ".join(f"@{a} (version {v})" for a, v in sorted(aliases.items()))
                raise UserError(
                    f"model '{name}' has no alias '{alias}'; its aliases: {listed or '(none)'}"
                )
            version = aliases[alias]
        known = [v.version for v in self.versions(name)]
        if version not in known:
            raise UserError(
                f"model '{name}' has no version {version}; its versions: "
                f"{', '.join(known) or '(none)'}"
            )
        return self.model_version(name, version)

    def _aliases(self, name: str) -> dict[str, str]:
        try:
            model = self.client.get_registered_model(name)
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        return {alias: str(version) for alias, version in model.aliases.items()}

    def study_links(self, study: str | None = None, ui: str = DEFAULT_UI) -> list[str]:
        """Where to look in the UI: each study's runs, its best trial and its model.

        Args:
            study: One study; default every study in the store.
            ui: Where the UI serves an embedded store (``mapnet-tune ui``'s address).
        """
        base = ui_base(self.uri, ui)
        if study is None:
            found = self.client.search_experiments(
                filter_string="tags.`mapnet_tune.kind` = 'study'", max_results=1000
            )
        else:
            found = [e for e in [self.client.get_experiment_by_name(study)] if e is not None]
        registered = {m.name for m in self.client.search_registered_models(max_results=1000)}
        lines = []
        for exp in sorted(found, key=lambda e: e.name):
            lines.append(f"study {exp.name}: {runs_url(base, exp.experiment_id)}")
            best = exp.tags.get(BEST_RUN_TAG)
            if best:
                lines.append(f"  best trial: {run_url(base, exp.experiment_id, best)}")
            name = model_name(exp.tags.get(DATASET_TAG, ""))
            if name in registered:
                lines.append(f"  registered model: {model_url(base, name)}")
        return lines

    def browse(self, study: str | None = None) -> str:
        """The end of a command's output: where in the MLflow UI to look next."""
        lines = self.study_links(study)
        if self.uri.startswith(("http://", "https://")):
            head = "Browse in the MLflow UI:"
        else:
            start = f"mapnet-tune ui --tracking-uri {self.uri}"
            head = f"Browse in the MLflow UI (start it with `{start}`):"
        return "\n".join([head, *lines])

    def serve_commands(self, model_uri: str, port: int = 5001) -> list[str]:
        """How to serve a registered model over HTTP and call it: shell lines, as printed.

        The server reads the model from this store; ``mlflow`` is the one installed beside
        mapnet-tune, so the lines work without an activated environment.
        """
        store = shlex.quote(redact_url(self.uri))
        payload = '{\\"inputs\\": [\\"$(base64 -w0 IMAGE.png)\\"]}'
        return [
            f"Serve {model_uri} over HTTP (images of any size; PNG or TIFF bytes, base64 in JSON):",
            f"  MLFLOW_TRACKING_URI={store} {_mlflow_command()} models serve -m {model_uri} "
            f"--env-manager local --port {port}",
            f"  curl -s http://127.0.0.1:{port}/invocations -H 'Content-Type: application/json' "
            f'-d "{payload}"',
            '  -> {"predictions": [{"probability": [[...]], "mask": [[...]]}]}: per image, its '
            "HxW foreground probabilities and the 0/1 mask at the model's threshold",
        ]

    def download(self, run_id: str, artifact_path: str, dst: str | Path) -> Path | None:
        """Download one artifact of a run into ``dst``; None when the run does not have it."""
        try:
            return Path(self.client.download_artifacts(run_id, artifact_path, str(dst)))
        except (mlflow.exceptions.MlflowException, OSError):
            return None


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered model version: where it came from and what it is tagged with."""

    name: str
    version: str
    run_id: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``name version N (@alias, ...)`` for messages."""
        marks = f" (@{', @'.join(self.aliases)})" if self.aliases else ""
        return f"{self.name} version {self.version}{marks}"


def _version_info(version: Any, aliases: Mapping[str, str]) -> ModelVersionInfo:
    number = str(version.version)
    return ModelVersionInfo(
        name=version.name,
        version=number,
        run_id=version.run_id or "",
        tags=dict(version.tags or {}),
        aliases=tuple(sorted(a for a, v in aliases.items() if v == number)),
    )


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.

    Raises:
        UserError: When the URI has neither form.
    """
    body = uri.removeprefix("models:/") if uri.startswith("models:/") else None
    if body and "@" in body and "/" not in body:
        name, alias = body.split("@", 1)
        if name and alias:
            return name, alias, None
    elif body and body.count("/") == 1:
        name, version = body.split("/")
        if name and version.isdigit():
            return name, None, version
    raise UserError(
        f"model URI '{uri}' must look like models:/mapnet-drive@champion or models:/mapnet-drive/3"
    )


def _mlflow_command() -> str:
    """``mlflow`` as this environment runs it, with its bin folder on PATH when it is not.

    ``mlflow models serve`` starts ``uvicorn`` from PATH, so naming the script is not enough;
    the folder is relative when near (``../.venv/bin`` in the demo), else absolute.
    """
    folder = Path(sys.executable).parent
    if not (folder / "mlflow").is_file() or shutil.which("mlflow") == str(folder / "mlflow"):
        return "mlflow"
    relative = os.path.relpath(folder)
    shown = relative if relative.count("..") <= 1 else str(folder)
    return f'PATH="{shown}:$PATH" mlflow'
