# autocontour service image for GPU hosts (works on CPU-only hosts too).
#   docker build -t autocontour .
#   docker run --gpus all -p 8000:8000 -v autocontour-data:/data autocontour
# Worker only (AUTOCONTOUR_QUEUE=celery): docker run --gpus all ... autocontour worker
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    AUTOCONTOUR_HOME=/opt/autocontour \
    AUTOCONTOUR_DATA_DIR=/data

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# The CUDA build of the pinned torch first, so the project install finds it satisfied.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128

WORKDIR /opt/autocontour
COPY pyproject.toml README.md ./
COPY autocontour ./autocontour
RUN pip install .
# Shipped weights, their model card and the support sets travel inside the image.
COPY models ./models
COPY support_sets ./support_sets

RUN useradd --create-home --uid 10001 autocontour \
    && mkdir -p /data \
    && chown autocontour /data
USER 10001
VOLUME ["/data"]
EXPOSE 8000

# The API answers /healthz; a worker container (`... autocontour worker`) checks its broker instead.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["autocontour", "health"]

ENTRYPOINT ["autocontour"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
