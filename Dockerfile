# The image of the dagster-webserver and dagster-daemon services of docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/home

WORKDIR /opt/protoagg
COPY pyproject.toml workspace.yaml ./
COPY protoagg_dagster ./protoagg_dagster
RUN pip install . && mkdir -p "$DAGSTER_HOME"
COPY deploy/dagster.local.yaml $DAGSTER_HOME/dagster.yaml

EXPOSE 3000
CMD ["dagster-webserver", "-h", "0.0.0.0", "-p", "3000", "-w", "workspace.yaml"]
