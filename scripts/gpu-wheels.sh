#!/usr/bin/env bash
# Fill .whl/ with every Python 3.12 wheel that scripts/gpu-check.sh installs on a GPU machine
# that has torch but not optuna, mlflow or albumentations: the shared download script's list,
# plus the pure-Python dependencies it leaves out that optuna, mlflow and retrain-best import.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/tools/gpu-wheels.sh .whl
extra=(
  packaging==26.4 tqdm==4.70.1 protobuf==7.36.2 requests==2.34.2 urllib3==2.8.0 idna==3.20
  certifi==2026.10.19.post1 annotated_doc==0.0.7 anyio==4.16.0 cloudpickle==3.1.3
  charset_normalizer==3.5.3
)
for p in "${extra[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$p"
done
du -sh .whl
