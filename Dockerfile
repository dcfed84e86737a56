# VoiceGrow server image: Python 3.11 slim, the package with its offline models (faster-whisper
# "base" from PyPI, piper's English voice), a non-root user. Build from the repository root:
#   docker build -t voicegrow-server:latest .        (deploy/docker-compose.yml does this for you)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtualenv with every dependency, then the package -----------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies come from setup.cfg alone, in their own layer, so a code change does not reinstall them.
COPY setup.cfg pyproject.toml ./
RUN python -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); print(c['options']['install_requires'])" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY . .
RUN pip install --no-deps .

# --- runtime ----------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# No ffmpeg: nothing calls it (faster-whisper decodes through PyAV, whose wheel carries its own
# libraries); Debian's ffmpeg added 683 MB, 38 % of the image.
RUN groupadd --system --gid 10001 voicegrow \
 && useradd --system --uid 10001 --gid voicegrow --create-home --home-dir /home/voicegrow \
      --shell /usr/sbin/nologin voicegrow \
 && mkdir -p /data /opt/voicegrow/models \
 && chown voicegrow:voicegrow /data /opt/voicegrow/models
COPY --from=build /opt/venv /opt/venv
# HF_HUB_OFFLINE: no code path downloads weights at run time; the packaged model is used instead.
# MALLOC_ARENA_MAX=2: glibc's per-thread arenas kept the freed audio buffers of every turn as free
# space that grew without end (docs/memory.md); `voicegrow serve` applies the same default itself.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    VOICEGROW_MODEL_CACHE=/opt/voicegrow/models \
    DATA_DIR=/data \
    WS_PORT=4399 \
    HTTP_PORT=8000
USER voicegrow
WORKDIR /home/voicegrow
# Join the two PyPI parts of the Whisper "base" model now, so that no container start pays for the
# 145 MB copy and hash; the cache belongs to the runtime user, who may re-verify it.
RUN python -c "from voicegrow.pipeline.asr_models import resolve_model; resolve_model('base')"
VOLUME ["/data"]
EXPOSE 4399 8000
# The slim image has no curl: ask the public health endpoint with Python (HTTP errors raise: exit 1).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, ssl, sys, urllib.request; tls = bool(os.environ.get('TLS_CERT_FILE')); url = '%s://127.0.0.1:%s/api/v1/health' % ('https' if tls else 'http', os.environ.get('HTTP_PORT', '8000')); sys.exit(0 if urllib.request.urlopen(url, timeout=4, context=ssl._create_unverified_context() if tls else None).status == 200 else 1)"]
CMD ["voicegrow", "serve"]
