# One image, both roles: `docker run IMAGE` runs the API (`ptq4dm serve`), `docker run IMAGE worker` a worker.
# CPU torch by default. CUDA: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (match the driver).
# 3.11 or newer: the deps stage reads pyproject.toml with tomllib.
ARG PYTHON_VERSION=3.11

# --- deps: a venv with torch and the runtime dependencies. Its inputs are pyproject.toml and the build args
# only, so editing the source never reinstalls gigabytes of torch.
FROM python:${PYTHON_VERSION}-slim AS deps
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the PyTorch index: PyPI's default wheel drags in the whole CUDA stack.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml /tmp/pyproject.toml
# The dependency list comes from pyproject.toml itself; torch is already satisfied, so pip keeps this build of it.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# --- build: the package as a wheel, and the built-in weights made readable for the non-root user
# (the checkout may hold them as 0600).
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY quantizer quantizer
COPY service service
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .
COPY models /models
RUN chmod -R a+rX /models

# --- runtime
FROM python:${PYTHON_VERSION}-slim AS runtime
# A fixed uid/gid, so volumes and Kubernetes' runAsUser / fsGroup can name it.
RUN groupadd --system --gid 10001 ptq4dm \
    && useradd --system --uid 10001 --gid ptq4dm --home-dir /home/ptq4dm --create-home ptq4dm \
    && install -d -o ptq4dm -g ptq4dm /var/cache/ptq4dm
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
COPY --from=build /models /opt/ptq4dm/models
COPY docker/healthcheck.py /opt/ptq4dm/healthcheck.py
COPY --from=build /dist /tmp/dist
RUN pip install --no-cache-dir --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist

# The wheel has no checkout around it: the weights are found through PTQ4DM_MODELS_DIR. Both ports listen on all
# interfaces (the defaults are loopback-only). Everything written at run time goes under the one volume: the
# calibration cache (shared by workers, so only one of them calibrates) and the compile caches.
ENV PTQ4DM_MODELS_DIR=/opt/ptq4dm/models \
    PTQ4DM_HOST=0.0.0.0 \
    PTQ4DM_HEALTH_HOST=0.0.0.0 \
    PTQ4DM_CALIBRATION_CACHE_DIR=/var/cache/ptq4dm/calibration \
    PTQ4DM_OPENVINO_CACHE_DIR=/var/cache/ptq4dm/openvino \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/ptq4dm/inductor \
    TRITON_CACHE_DIR=/var/cache/ptq4dm/triton \
    HF_HOME=/var/cache/ptq4dm/huggingface
VOLUME ["/var/cache/ptq4dm"]

USER 10001:10001
WORKDIR /home/ptq4dm
# 8000: API (serve); 8001: worker probes and /metrics.
EXPOSE 8000 8001
# Liveness only (/livez never looks at Redis or the model); whichever of the two ports this role serves.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 CMD ["python", "/opt/ptq4dm/healthcheck.py"]
ENTRYPOINT ["ptq4dm"]
CMD ["serve"]
