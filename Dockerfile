# The mapnet-tune worker image (the `worker` service of docker-compose.yml).
#
# PyPI's Linux build of torch carries its own CUDA libraries, so the host needs only the
# NVIDIA driver and the NVIDIA Container Toolkit.
FROM python:3.11-slim

ARG TORCH=torch==2.13.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MAPNET_TUNE_CACHE=/cache

RUN apt-get update \
    && apt-get install -y --no-install-recommends libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

# torch first and pinned, so that the project's range never resolves to another build.
RUN pip install "$TORCH"
# A regular install: the shipped study files are package data (mapnet_tune/studies), so the
# source is not needed once installed.
COPY pyproject.toml README.md /tmp/src/
COPY mapnet_tune /tmp/src/mapnet_tune
RUN pip install /tmp/src && rm -rf /tmp/src

RUN useradd --create-home --uid 1000 mapnet \
    && mkdir -p /cache /data /work \
    && chown mapnet /cache /work
USER mapnet
WORKDIR /work
ENTRYPOINT ["mapnet-tune"]
CMD ["--help"]
