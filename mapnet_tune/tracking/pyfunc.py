"""The registered model as MLflow runs it: a pyfunc shell around the Predictor.

The logged model's ``python_function`` flavour names this module as its ``loader_module``;
MLflow calls :func:`_load_pyfunc` with the model folder (``model.json`` and
``weights.safetensors``) and calls ``predict`` on what it returns, in process
(``mlflow.pyfunc.load_model``) and behind ``mlflow models serve``. The model is thereby a
:class:`~mlflow.pyfunc.PythonModel` that MLflow never serialises as an object: the logged
model holds this source (with the rest of the prediction code) and the weights as plain
tensors, and loading it runs only that source.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from mapnet_tune.errors import UserError
from mapnet_tune.predictor import Predictor
from mapnet_tune.serving import decode_inputs, encode_outputs

#: The artifact name under which the model folder reaches ``load_context``.
MODEL_ARTIFACT = "model"


class MapNetModel(mlflow.pyfunc.PythonModel):
    """MAP-Net for images of any size: probability map and mask per image."""

    # MLflow would wrap ``predict`` to validate inputs against its type hints, and warns when
    # it has none; the shell checks images itself, with messages that name them.
    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Rebuild the predictor from the model folder (on CUDA when present)."""
        self.predictor = Predictor.from_folder(context.artifacts[MODEL_ARTIFACT])

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """Maps and masks for one image or a batch (see :mod:`mapnet_tune.serving`).

        Raises:
            MlflowException: INVALID_PARAMETER_VALUE (HTTP 400 when served) with one line
                naming the bad input and the fix.
        """
        try:
            images, single = decode_inputs(model_input)
            names = ["the image"] if single else None
            return encode_outputs(self.predictor.predict(images, names=names), single)
        except UserError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None

    def get_raw_model(self) -> Predictor:
        """The predictor, for callers that want its options (``predict --tta``) or device."""
        return self.predictor


def _load_pyfunc(path: str) -> MapNetModel:
    """MLflow's entry point: the model from the logged model's data folder."""
    model = MapNetModel()
    model.load_context(mlflow.pyfunc.PythonModelContext({MODEL_ARTIFACT: path}, None))
    return model
