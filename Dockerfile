# Minimal image for the CLI; the service issue extends it (CUDA base, server, health check).
FROM python:3.11-slim
WORKDIR /opt/autocontour
COPY pyproject.toml README.md ./
COPY app ./app
COPY models ./models
COPY support_sets ./support_sets
RUN pip install --no-cache-dir -e .
RUN useradd --create-home autocontour
USER autocontour
ENTRYPOINT ["autocontour"]
