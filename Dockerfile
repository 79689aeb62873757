# One image for every moonq role; docker-compose.yml picks the role by its command:
#   worker     celery -A worker worker                (the default CMD)
#   gateway    moonq gateway --host 0.0.0.0 --port 8000
#   simulator  moonq simulate --host 0.0.0.0 --port 8787
#   any CLI    moonq submit|follow|status|top|batch|failed|retry ...
# No secrets in here: MOONSHOT_API_KEY and MOONQ_GATEWAY_TOKENS come from the environment at run time.

# ---- build: the project and its dependencies into a virtualenv ----
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/moonq
ENV PATH=/opt/moonq/bin:$PATH
WORKDIR /src

# Dependencies first, in their own layer: a code change does not reinstall them. The package
# directories are stubs here so that `pip install .` resolves the dependencies from pyproject.toml.
COPY pyproject.toml README.md ./
RUN for p in moonq producers worker gateway console simulator harness; do mkdir "$p" && touch "$p/__init__.py"; done \
 && pip install --no-cache-dir . \
 && pip uninstall --yes moonq \
 && rm -rf moonq producers worker gateway console simulator harness build ./*.egg-info

# Then the project itself (non-editable; the runtime stage gets no source tree).
COPY moonq/ moonq/
COPY producers/ producers/
COPY worker/ worker/
COPY gateway/ gateway/
COPY console/ console/
COPY simulator/ simulator/
COPY harness/ harness/
RUN pip install --no-cache-dir --no-deps . \
 && python -m compileall -q /opt/moonq/lib

# ---- runtime ----
FROM python:3.11-slim

ENV PATH=/opt/moonq/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 moonq \
 && useradd --system --uid 10001 --gid moonq --home-dir /home/moonq --create-home --shell /usr/sbin/nologin moonq
COPY --from=build /opt/moonq /opt/moonq

USER 10001:10001
WORKDIR /home/moonq
# 9464 worker /metrics (MOONQ_METRICS_PORT), 8000 gateway, 8787 simulator.
EXPOSE 9464 8000 8787
CMD ["celery", "-A", "worker", "worker"]
