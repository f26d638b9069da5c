# One image for every govgate role: compose.yaml builds it once (as govgate:local) and every
# service that runs govgate (gateway, each model's worker, one-off `keys`/`audit` commands)
# reuses it by name and picks the command.
#
# Python 3.11: the version the project's wheels and tests are pinned against.
FROM python:3.11-slim-bookworm

# libgomp1: the llama.cpp wheel (xllamacpp, the Gemma worker's backend) links OpenMP's runtime,
# which python:slim does not ship; without it the worker fails as it loads the backend.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*

# An unprivileged user: nothing in govgate needs root, and the folders the named volumes are
# mounted on are created here, owned by it, so a fresh volume starts with that owner and mode.
RUN groupadd --system --gid 10001 govgate \
 && useradd --system --uid 10001 --gid govgate --home-dir /var/lib/govgate --no-create-home \
            --shell /usr/sbin/nologin govgate

WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY govgate ./govgate
COPY gateway ./gateway
COPY workers ./workers
COPY audit ./audit
RUN pip install --no-cache-dir -c constraints.txt . && rm -rf build *.egg-info
COPY policies ./policies
# The health checks compose.yaml runs (python's urllib and Celery: nothing else to install).
COPY deploy/healthcheck.py ./deploy/healthcheck.py

# 0700: key and working folders are the service's alone (the volumes inherit this on first use).
# No VOLUME instruction on purpose: an unmounted VOLUME would give each container an anonymous
# volume of its own, i.e. gateway and workers silently holding *different* payload keys.
RUN install -d -o govgate -g govgate -m 0700 /var/lib/govgate /etc/govgate/keys /etc/govgate/signing \
 && install -d -o govgate -g govgate -m 0755 /models

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GOVGATE_POLICY_DIR=/app/policies \
    GOVGATE_VAR_DIR=/var/lib/govgate \
    GOVGATE_HOST=0.0.0.0 \
    GOVGATE_PORT=8080

USER govgate
EXPOSE 8080
# No HEALTHCHECK here: the image runs gateways and workers, whose checks differ (compose.yaml has one each).
ENTRYPOINT ["govgate"]
CMD ["serve"]
