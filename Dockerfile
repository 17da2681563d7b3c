# luxsci-proxy as a sidecar container.
#   docker build -t luxsci-proxy .
#   docker run --rm -v "$PWD/config.yaml:/etc/luxsci-proxy/config.yaml:ro" \
#     -e LUXSCI_API_TOKEN -e LUXSCI_API_SECRET luxsci-proxy
# Config comes from a mounted file, secrets from the environment or mounted secret files.

FROM python:3.11-slim AS build
WORKDIR /src
# LICENSE: pyproject.toml names it in license-files, so the wheel cannot build without it.
COPY pyproject.toml README.md LICENSE ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[speed]"

FROM python:3.11-slim
# A fixed, unprivileged uid so volume and secret permissions can be planned for.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin luxsci \
    && mkdir -p /var/lib/luxsci-proxy && chown 10001 /var/lib/luxsci-proxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels /wheels/*.whl && rm -rf /wheels
USER 10001
# The day's request count survives restarts in the state dir (mount a volume to keep it
# across container replacements).
ENV LUXSCI_PROXY_CONFIG=/etc/luxsci-proxy/config.yaml \
    LUXSCI_PROXY_STATE_DIR=/var/lib/luxsci-proxy \
    LUXSCI_PROXY_ADMIN_PORT=9100 \
    PYTHONUNBUFFERED=1
EXPOSE 8080 9100
# /healthz on the admin listener; set LUXSCI_PROXY_ADMIN_PORT if admin.port differs.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['LUXSCI_PROXY_ADMIN_PORT'], timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["luxsci-proxy"]
CMD ["run"]
