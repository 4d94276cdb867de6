# syntax=docker/dockerfile:1
# The control-plane image: `gpufleet operator` and `gpufleet router` (no torch).
#   docker build -f deploy/docker/gpufleet.Dockerfile -t ghcr.io/gpufleet/gpufleet:0.1.0 .
# Only the router and operator extras: no torch, transformers or pod server libraries.

FROM python:3.11-slim AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 10001 gpufleet && useradd --uid 10001 --gid 10001 --no-create-home gpufleet
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/*.whl)[router,operator]" \
 && rm -rf /wheels \
 && gpufleet operator --help >/dev/null && gpufleet router --help >/dev/null \
 && ! python -c 'import torch' 2>/dev/null
USER 10001:10001
EXPOSE 8000 8080
ENTRYPOINT ["gpufleet"]
CMD ["router"]
