# One image for every zdistill daemon (zdistill-teacher, zdistill-register,
# zdistill-balancer), the `zdistill` probe/status CLI and student jobs.
# CPU build; the GPU teacher image is Dockerfile.gpu (same layout, CUDA base).
#
#   docker build -t zdistill:0.1.0 .
#   docker build -t zdistill:0.1.0 --build-arg ZDISTILL_EXTRAS=metrics .   # no Paddle: Python-callable teachers only
#
# No secrets are baked in: the Redis password and CURVE keys come at run time from
# Kubernetes Secrets (env ZDISTILL_DB_PASSWD, key files mounted read-only), see deploy/README.md.
# The build context is an allow-list (.dockerignore), so a stray key file in the
# work tree cannot end up in a layer.

ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

# paddle: the CPU inference runtime; metrics: prometheus-client for --metrics-port.
ARG ZDISTILL_EXTRAS=paddle,metrics

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Paddle's CPU kernels link against the system libgomp, which the slim image lacks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

# setup.py reads README.md for the long description, so both are needed to build.
COPY setup.py README.md /tmp/zdistill/
COPY zdistill /tmp/zdistill/zdistill
RUN pip install "/tmp/zdistill[${ZDISTILL_EXTRAS}]" \
    && rm -rf /tmp/zdistill \
    && zdistill --help >/dev/null

# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it; group 0 so the
# image also runs under OpenShift-style arbitrary uids.
RUN useradd --system --uid 10001 --gid 0 --create-home --home-dir /home/zdistill zdistill
USER 10001
WORKDIR /home/zdistill

# Documentation only: teacher 9292; balancer ROUTER 7001 + PUB 7002; metrics 9400-9402.
EXPOSE 9292 7001 7002 9400 9401 9402

# Each Kubernetes container sets its own command (zdistill-teacher, zdistill-register, ...).
CMD ["zdistill", "--help"]
