# The project image: one image for every service of docker-compose.yml that runs our code
# (the Ray head, the Ray workers, the scheduler) and for the MLflow tracking server.
#
#   docker build -t autoassign-ray .        (docker compose build does this for the stack)
#
# It installs the project the way scripts/install.sh does, with the same torch/torchvision
# pins (tests/unit/test_compose_stack.py fails when the two disagree), without the dev extras.
# No credential is baked in: every one comes from the environment the stack gives at run time.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0

# A non-root user with a home (Ray and MLflow write caches and temp files under it).
ARG APP_UID=1000
ARG APP_GID=1000
RUN groupadd --gid "${APP_GID}" autoassign \
    && useradd --uid "${APP_UID}" --gid "${APP_GID}" --create-home --shell /bin/bash autoassign

WORKDIR /app

# torch and torchvision first, pinned together (as scripts/install.sh): mixing builds breaks
# torchvision's C++ ops. Their own layer, so code changes do not reinstall them.
RUN python -m pip install --upgrade pip \
    && python -m pip install "torch==2.14.1" "torchvision==0.29.1"

COPY pyproject.toml README.md ./
COPY autoassign/ autoassign/
COPY orchestration/ orchestration/
COPY configs/ configs/
COPY scripts/ scripts/
COPY deploy/ deploy/

# The project (no dev extras), plus what the stack cannot run without:
# - ray[default]: the dashboard and its Jobs API (port 8265), which `ray start --head` only
#   runs with these extras (named here too, so the image has them whatever pyproject says;
#   pip resolves it to the project's own Ray version).
# - psycopg 3: the MLflow server's PostgreSQL backend store (SQLAlchemy 2.1, which MLflow
#   uses, reads postgresql:// URIs with psycopg 3, not psycopg2).
RUN python -m pip install . "ray[default]" "psycopg[binary]>=3.1,<4" \
    && rm -rf build ./*.egg-info

# /state (the scheduler's) and /auth (MLflow's users) are named volumes: a fresh volume takes
# its folder's owner, so the non-root user can write its database there.
RUN mkdir -p /state /auth && chown autoassign:autoassign /state /auth

USER autoassign
ENV HOME=/home/autoassign
