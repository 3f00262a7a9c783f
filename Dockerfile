# incountry-proxy: slim Python base, non-root user, `serve` as the entry point.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PROXY_LISTEN_HOST=0.0.0.0 \
    PROXY_LISTEN_PORT=8080

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin proxy
COPY config ./config

USER 10001
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/_proxy/health' % os.environ['PROXY_LISTEN_PORT'], timeout=2)"]
ENTRYPOINT ["incountry-proxy"]
CMD ["serve", "--config", "/app/config/incountry.yaml"]
