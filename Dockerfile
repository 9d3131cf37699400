# The training worker's image: `python -m bc_pipeline.training.worker --spec ...` with Keras on JAX and CUDA.
#
#   docker build -t bc-pipeline-worker:latest .                       # JAX + CUDA 12 (default)
#   docker build --build-arg BACKEND="torch" -t bc-pipeline-worker .  # or PyTorch
#
# It holds the worker's needs only (pyproject's `worker` extra: Keras, numpy, pandas, pyarrow,
# dagster-pipes) and the backend; no Dagster, TensorFlow or keras-cv. The `trained_model` asset
# starts it through PipesDockerClient or PipesK8sClient with the data directory mounted at /data
# (BC_WORKER_DATA_DIR), so the spec's paths resolve there. See docs/operations.md: "Training on a GPU node or
# on Kubernetes".
FROM python:3.12-slim

ARG BACKEND="jax[cuda12]"
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BC_WORKER_DATA_DIR=/data XLA_PYTHON_CLIENT_MEM_FRACTION=0.9

WORKDIR /opt/bc_pipeline
COPY pyproject.toml README.md ./
COPY bc_pipeline ./bc_pipeline
# The worker extra, read from pyproject.toml so the list lives in one place; then the package
# itself without its pipeline dependencies.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['worker']))" > /tmp/worker.txt \
    && pip install -r /tmp/worker.txt "${BACKEND}" \
    && pip install --no-deps . \
    && python -c "import bc_pipeline.training.worker.fit, keras; print('worker image: Keras', keras.__version__)"

WORKDIR /data
ENTRYPOINT ["python", "-m", "bc_pipeline.training.worker"]
