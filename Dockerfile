# syntax=docker/dockerfile:1
# One image for every role; the command picks it: `api` (HTTP service), `worker` (Celery encode /
# decode worker) or `migrate` (schema upgrade only). See docker/entrypoint.sh and the README's
# "Deployment" section.
#
# The install step is the one CI runs (`make venv`, the Makefile's rule behind `make test`), only
# without the dev extras. torch comes from PyPI here; its Linux wheel carries CUDA, and workers
# fall back to the CPU when no GPU is visible.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md Makefile ./
COPY service ./service
# The venv lives at the path it keeps in the runtime stage (venvs are not relocatable).
RUN make venv VENV=/app/.venv EXTRAS= \
 && find /app -name __pycache__ -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 compass \
 && useradd --system --uid 10001 --gid compass --home-dir /app --shell /usr/sbin/nologin compass \
 && mkdir -p /data \
 && chown compass:compass /data
WORKDIR /app
COPY --from=build /app /app
COPY model_store ./model_store
COPY docker/entrypoint.sh docker/healthcheck.py ./docker/
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    COMPASS_DATA_DIR=/data \
    COMPASS_HOST=0.0.0.0 \
    PYTORCH_NVML_BASED_CUDA_CHECK=1
USER compass
# 8000: API; 8001: a worker's /healthz and /readyz.
EXPOSE 8000 8001
VOLUME ["/data"]
ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["api"]
