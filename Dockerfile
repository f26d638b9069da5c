# One image for every govgate role (gateway, worker); compose.yaml picks the command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY govgate ./govgate
COPY gateway ./gateway
COPY workers ./workers
COPY audit ./audit
RUN pip install --no-cache-dir .
COPY policies ./policies
ENV GOVGATE_POLICY_DIR=/app/policies \
    GOVGATE_VAR_DIR=/var/lib/govgate \
    GOVGATE_HOST=0.0.0.0
ENTRYPOINT ["govgate"]
