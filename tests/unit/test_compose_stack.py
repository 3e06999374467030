"""The container stack (Dockerfile, docker-compose.yml, .env.example, schedules/), checked
offline: no Docker engine is needed, only the ``docker-compose`` CLI (Debian's package, whose
``config`` command interpolates and validates without a daemon) and its bundled Compose
Specification schema. Without them these checks skip, unless ``AUTOASSIGN_REQUIRE_COMPOSE=1``
(as in ``.ci/run``), where they fail instead.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
INSTALL_SH = ROOT / "scripts" / "install.sh"
SCHEDULES = ROOT / "schedules" / "schedules.yaml"

SERVICES = {
    "postgres",
    "minio",
    "minio-buckets",
    "mlflow",
    "ray-head",
    "ray-worker",
    "scheduler",
}
PROJECT_IMAGE_SERVICES = ("mlflow", "ray-head", "ray-worker", "scheduler")
SCHEMA_CANDIDATES = (
    "/usr/lib/python3/dist-packages/compose/config/compose_spec.json",
    "/usr/lib/python3*/site-packages/compose/config/compose_spec.json",
    "/usr/local/lib/python3*/*-packages/compose/config/compose_spec.json",
)
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ROOT_USER|ACCESS_KEY")
TIMEOUT_S = 60


def _unavailable(reason: str) -> None:
    """Skip, or fail where CI promised the tool (AUTOASSIGN_REQUIRE_COMPOSE=1)."""
    if os.environ.get("AUTOASSIGN_REQUIRE_COMPOSE") == "1":
        pytest.fail(f"{reason} (AUTOASSIGN_REQUIRE_COMPOSE=1)")
    pytest.skip(f"{reason}; apt-get install -y docker-compose")


def _env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


def _compose(*args: str, env_file: Path, extra_env: dict[str, str] | None = None):
    """``docker-compose --env-file ENV -f docker-compose.yml ARGS``, with none of the stack's
    variables inherited from the caller's shell (Compose prefers those over the env file)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        _unavailable("the docker-compose CLI is not installed")
    names = set(_env_file(ENV_EXAMPLE))
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("COMPOSE_")}
    env.update(extra_env or {})
    return subprocess.run(
        [binary, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def _resolve(extra_env: dict[str, str] | None = None) -> dict:
    result = _compose("config", env_file=ENV_EXAMPLE, extra_env=extra_env)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def resolved() -> dict:
    """The stack as Compose resolves it with .env.example."""
    return _resolve()


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _ports(service: dict) -> list[tuple[str | None, str, str]]:
    """(host_ip, published, target) of each port, short ("IP:HOST:CTR/tcp") or long syntax."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip"), str(port.get("published")), str(port["target"])))
            continue
        spec = str(port).split("/")[0]
        parts = spec.rsplit(":", 2)
        if len(parts) == 3:
            out.append((parts[0], parts[1], parts[2]))
        else:
            out.append((None, parts[0] if len(parts) == 2 else "", parts[-1]))
    return out


def _bytes(size: str | int) -> int:
    """Docker's size syntax (``16gb``, ``8g``, ``512m``, bytes), in binary units."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)b?", str(size).strip().lower())
    assert match, f"not a size: {size!r}"
    return int(float(match[1]) * 1024 ** "_kmg".index(match[2] or "_"))


def _depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def _mounts(service: dict) -> list[list[str]]:
    """[source, target] of each volume, short ("SRC:DST:MODE") or long syntax."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out.append([str(volume.get("source")), str(volume["target"])])
        else:
            out.append(str(volume).split(":")[:2])
    return out


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b(torch|torchvision)==([0-9][0-9A-Za-z.+]*)", text))


def test_compose_config_resolves_the_seven_services(resolved):
    """``docker compose up`` with a .env made from .env.example starts these services."""
    assert set(resolved["services"]) == SERVICES


def test_raw_file_matches_the_compose_specification(raw):
    """The file is valid Compose Specification (no legacy top-level ``version:``), checked
    against the schema docker-compose ships, so ``docker compose`` v2 reads it as written."""
    jsonschema = pytest.importorskip("jsonschema")
    found = [p for pattern in SCHEMA_CANDIDATES for p in sorted(glob.glob(pattern))]
    if os.environ.get("COMPOSE_SPEC_SCHEMA"):
        found.insert(0, os.environ["COMPOSE_SPEC_SCHEMA"])
    if not found:
        _unavailable("no Compose Specification schema (docker-compose's compose_spec.json)")
    schema = json.loads(Path(found[0]).read_text())
    errors = sorted(
        jsonschema.Draft201909Validator(schema).iter_errors(raw), key=lambda e: e.json_path
    )
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors)
    assert "version" not in raw


def test_every_variable_the_file_uses_is_in_env_example():
    """``cp .env.example .env`` is enough: every ``${VAR}`` the compose file reads is there."""
    text = COMPOSE_FILE.read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    missing = used - set(_env_file(ENV_EXAMPLE))
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_published_ports_bind_to_localhost_and_postgres_is_not_published(resolved):
    """Nothing is reachable from other machines unless BIND_ADDRESS says so."""
    published = {}
    for name, service in resolved["services"].items():
        for host_ip, host_port, target in _ports(service):
            assert host_ip == "127.0.0.1", f"{name}: port {target} is published on {host_ip!r}"
            published[host_port] = name
    assert published == {
        "5000": "mlflow",
        "8265": "ray-head",
        "9000": "minio",
        "9001": "minio",
    }
    assert "ports" not in resolved["services"]["postgres"]


def test_bind_address_is_overridable():
    """A cluster behind a firewall can publish on its LAN address by setting BIND_ADDRESS."""
    services = _resolve({"BIND_ADDRESS": "10.1.2.3"})["services"]
    ips = {ip for service in services.values() for ip, _, _ in _ports(service)}
    assert ips == {"10.1.2.3"}


def test_ray_worker_scales_and_reserves_the_gpus(resolved):
    """``--scale ray-worker=N`` works (no fixed name, no host port) and each worker gets
    every GPU of its host; the head has none, so training lands on workers."""
    worker = resolved["services"]["ray-worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]} in devices
    head_command = resolved["services"]["ray-head"]["command"]
    assert "--head" in head_command and "--num-gpus=0" in head_command
    assert "--address=ray-head:6379" in worker["command"]


def test_ray_nodes_have_a_large_shared_memory(resolved):
    """Ray's object store lives in /dev/shm, which Docker limits to 64 MB by default."""
    for name in ("ray-head", "ray-worker"):
        shm = resolved["services"][name].get("shm_size")
        assert shm is not None and _bytes(shm) >= 8 * 1024**3, f"{name}: shm_size {shm!r}"


def test_long_running_services_have_healthchecks(resolved):
    """``depends_on: condition: service_healthy`` needs them; the project image (slim) has no
    curl, so its checks must not use it."""
    services = resolved["services"]
    for name in ("postgres", "minio", "mlflow", "ray-head"):
        test = services[name].get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no healthcheck"
    for name in PROJECT_IMAGE_SERVICES:
        test = services[name].get("healthcheck", {}).get("test", [])
        assert "curl" not in " ".join(test), f"{name}: curl is not in the image"
    assert "http://localhost:5000/health" in " ".join(services["mlflow"]["healthcheck"]["test"])


def test_services_start_in_dependency_order(resolved):
    """MLflow starts once its database is up and its bucket exists; Ray once MLflow is up;
    workers and the scheduler once the head (and its Jobs API) answers."""
    services = resolved["services"]
    expected = {
        "minio-buckets": {"minio": "service_healthy"},
        "mlflow": {
            "postgres": "service_healthy",
            "minio-buckets": "service_completed_successfully",
        },
        "ray-head": {"mlflow": "service_healthy"},
        "ray-worker": {"ray-head": "service_healthy"},
        "scheduler": {"ray-head": "service_healthy"},
    }
    for name, deps in expected.items():
        assert _depends_on(services[name]) == deps, name
    assert str(services["minio-buckets"].get("restart")) == "no"
    assert services["scheduler"]["restart"] == "unless-stopped"


def test_state_lives_in_named_volumes(resolved):
    """The database, the objects and the scheduler's memory survive ``docker compose down``
    (not ``down -v``)."""
    assert {"postgres-data", "minio-data", "scheduler-state"} <= set(resolved["volumes"])
    mounts = {name: _mounts(service) for name, service in resolved["services"].items()}
    assert ["postgres-data", "/var/lib/postgresql/data"] in mounts["postgres"]
    assert ["minio-data", "/data"] in mounts["minio"]
    assert ["scheduler-state", "/state"] in mounts["scheduler"]
    assert any(target == "/app/schedules" for _, target in mounts["scheduler"])


def test_mlflow_runs_without_the_genai_job_consumers(resolved):
    """MLflow 3 starts huey job consumers beside its server unless told not to; the
    platform submits no GenAI job, and idle they cost CPU (see docker-compose.yml)."""
    environment = resolved["services"]["mlflow"]["environment"]
    assert environment["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_mlflow_serves_without_an_access_line_per_request_unless_asked(resolved):
    """uvicorn's access log is 5 lines per trial and a tenth of the server's CPU per request
    (benchmarks/sweep_scale.py); an operator turns it on in .env."""
    environment = resolved["services"]["mlflow"]["environment"]
    assert environment["MLFLOW_UVICORN_OPTS"] == "--no-access-log"
    assert _env_file(ENV_EXAMPLE)["MLFLOW_UVICORN_OPTS"] == "--no-access-log"
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["mlflow"]["environment"]
    assert raw["MLFLOW_UVICORN_OPTS"] == "${MLFLOW_UVICORN_OPTS:---no-access-log}"


def test_mlflow_keeps_runs_in_postgres_and_proxies_artifacts_to_s3(resolved):
    """Runs go to PostgreSQL, artifacts to the MinIO bucket through the server."""
    mlflow = resolved["services"]["mlflow"]
    command = mlflow["command"]
    assert isinstance(command, list) and command[:2] == ["mlflow", "server"]
    assert "--backend-store-uri" not in command  # it holds the password: see the next test
    store = mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert re.fullmatch(r"postgresql://[^:@/]+:[^@/]+@postgres:5432/\w+", store), store
    env = _env_file(ENV_EXAMPLE)
    destination = command[command.index("--artifacts-destination") + 1]
    assert destination == f"s3://{env['MLFLOW_BUCKET']}/mlflow"
    assert "--no-serve-artifacts" not in command
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    allowed = mlflow["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert "mlflow:*" in allowed, "the Ray containers call it as mlflow:5000"
    for name in ("ray-head", "ray-worker"):
        ray_env = resolved["services"][name]["environment"]
        assert ray_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert ray_env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert resolved["services"]["scheduler"]["environment"]["RAY_ADDRESS"] == (
        "http://ray-head:8265"
    )


def _command_lines(service: dict) -> list[str]:
    """What the service's processes get as arguments (which ``ps`` shows on the host)."""
    lines = []
    for key in ("entrypoint", "command"):
        value = service.get(key) or []
        lines += [value] if isinstance(value, str) else [str(word) for word in value]
    lines += [str(word) for word in service.get("healthcheck", {}).get("test", [])]
    return lines


def test_no_secret_is_on_a_command_line(resolved):
    """Every credential reaches its process through the environment; on the host, anyone
    can read a container's command lines (``ps``, ``docker inspect``'s Args, logs of
    crashed commands). MLflow reads the backend store URI from MLFLOW_BACKEND_STORE_URI."""
    from mlflow.cli import server

    secrets = {k: v for k, v in _env_file(ENV_EXAMPLE).items() if SECRET_NAME.search(k)}
    for name, service in resolved["services"].items():
        words = " ".join(_command_lines(service))
        for key, value in secrets.items():
            assert value not in words, f"{name}: {key}'s value is on its command line"
    store = resolved["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert secrets["POSTGRES_PASSWORD"] in store
    option = next(p for p in server.params if p.name == "backend_store_uri")
    assert option.envvar == "MLFLOW_BACKEND_STORE_URI"  # the installed MLflow's server reads it


def test_no_secret_is_written_in_the_compose_file():
    """Credentials come only from .env through interpolation, never inline."""
    text = COMPOSE_FILE.read_text()
    secrets = {k: v for k, v in _env_file(ENV_EXAMPLE).items() if SECRET_NAME.search(k)}
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"} <= set(secrets)
    for name, value in secrets.items():
        assert value and value not in text, f"{name}'s value is written in docker-compose.yml"
        assert "change-me" in value, f".env.example: {name} is not an obvious placeholder"
    assert ".env" in COMPOSE_FILE.parent.joinpath(".gitignore").read_text().splitlines()
    assert ".env" in (ROOT / ".dockerignore").read_text().splitlines()


@pytest.mark.parametrize(
    "name", ["POSTGRES_PASSWORD", "RAY_AUTH_TOKEN", "MLFLOW_ADMIN_PASSWORD", "MINIO_ROOT_USER"]
)
def test_a_missing_required_variable_stops_compose_naming_it(tmp_path, name):
    """A .env without a credential fails at ``docker compose up``/``config``, saying which:
    no key has a default, so no stack starts with an open door."""
    lines = ENV_EXAMPLE.read_text().splitlines()
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join(x for x in lines if not x.startswith(f"{name}=")))
    result = _compose("config", env_file=env_file)
    assert result.returncode != 0
    assert name in result.stderr + result.stdout


RAY_SERVICES = ("ray-head", "ray-worker", "scheduler")


def test_ray_runs_with_token_auth_and_one_token_everywhere(resolved):
    """The Jobs API runs any code it is sent: the head, every worker and the scheduler run
    with Ray's token authentication and the one token of .env, and the head's healthcheck
    asks a path that token auth leaves open (so it does not need the token)."""
    import ray.dashboard.http_server_head as head_source

    token = _env_file(ENV_EXAMPLE)["RAY_AUTH_TOKEN"]
    for name in RAY_SERVICES:
        environment = resolved["services"][name]["environment"]
        assert environment["RAY_AUTH_MODE"] == "token", name
        assert environment["RAY_AUTH_TOKEN"] == token, name
    check = " ".join(resolved["services"]["ray-head"]["healthcheck"]["test"])
    path = re.search(r"localhost:8265(/[\w/]+)", check)[1]
    assert f'"{path}"' in Path(head_source.__file__).read_text()  # Ray's public paths


def test_mlflow_requires_sign_in_and_every_client_signs_in(resolved):
    """MLflow's basic-auth app with its users on a named volume; the admin comes from .env
    (the ini file holds no password); the Ray nodes and the scheduler sign in through
    MLflow's standard MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    import configparser

    env = _env_file(ENV_EXAMPLE)
    mlflow = resolved["services"]["mlflow"]
    command = mlflow["command"]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    environment = mlflow["environment"]
    assert environment["MLFLOW_AUTH_ADMIN_USERNAME"] == env["MLFLOW_ADMIN_USERNAME"]
    assert environment["MLFLOW_AUTH_ADMIN_PASSWORD"] == env["MLFLOW_ADMIN_PASSWORD"]
    assert environment["MLFLOW_FLASK_SERVER_SECRET_KEY"] == env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    ini_in_image = environment["MLFLOW_AUTH_CONFIG_PATH"]
    assert ini_in_image.startswith("/app/")
    ini = ROOT / ini_in_image.removeprefix("/app/")
    assert f"COPY {ini.parent.name}/ {ini.parent.name}/" in DOCKERFILE.read_text()
    config = configparser.ConfigParser()
    config.read(ini)
    assert "admin_password" not in config["mlflow"]
    database = config["mlflow"]["database_uri"]
    assert database.startswith("sqlite:////auth/")
    assert ["mlflow-auth", "/auth"] in _mounts(mlflow)
    for name in RAY_SERVICES:
        environment = resolved["services"][name]["environment"]
        assert environment["MLFLOW_TRACKING_USERNAME"] == env["MLFLOW_ADMIN_USERNAME"], name
        assert environment["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_ADMIN_PASSWORD"], name


def test_the_minio_console_is_only_on_the_bind_address(resolved):
    env = _env_file(ENV_EXAMPLE)
    ports = {target: host for host, _, target in _ports(resolved["services"]["minio"])}
    assert ports == {"9000": env["BIND_ADDRESS"], "9001": env["BIND_ADDRESS"]}


def test_dockerfile_runs_as_non_root_with_install_sh_pins():
    """The image installs the same torch/torchvision as scripts/install.sh (a change to one
    without the other fails here), before the project, and runs as a non-root user with no
    credential baked in."""
    dockerfile = DOCKERFILE.read_text()
    instructions = [
        line.strip() for line in dockerfile.replace("\\\n", " ").splitlines() if line.strip()
    ]
    instructions = [line for line in instructions if not line.startswith("#")]
    pins = _pins(INSTALL_SH.read_text())
    assert set(pins) == {"torch", "torchvision"}, "scripts/install.sh pins no torch/torchvision"
    assert _pins(dockerfile) == pins
    runs = [line for line in instructions if line.startswith("RUN ")]
    torch_step = next(i for i, line in enumerate(runs) if "torch==" in line)
    project_step = next(
        i for i, line in enumerate(runs) if re.search(r"pip install \.(\s|$)", line)
    )
    assert torch_step < project_step
    assert "[dev]" not in dockerfile
    assert "psycopg[binary]" in runs[project_step]  # what SQLAlchemy 2.1 opens postgresql:// with
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    for line in instructions:
        if line.startswith(("ENV ", "ARG ")):
            assert not SECRET_NAME.search(line), f"a credential in the image: {line}"


def test_the_example_schedule_loads_as_the_scheduler_service_reads_it(tmp_path):
    """schedules/schedules.yaml is valid for ``orchestration.jobs schedule``, targets the
    stack's head, uploads the project folder (/app in the image) and keeps checkpoints in the
    stack's checkpoint bucket, which every worker container can reach."""
    from orchestration.cluster.schedules import load_schedule_file

    project = tmp_path / "app"
    for folder in ("configs", "schedules"):
        shutil.copytree(ROOT / folder, project / folder)
    schedules = load_schedule_file(project / "schedules" / "schedules.yaml")
    assert schedules.address == "http://ray-head:8265"
    assert schedules.working_dir == project
    nightly = schedules.schedule("nightly-multi-dataset")
    assert nightly.cron == "0 2 * * *"
    assert nightly.config == project / "configs" / "multi_dataset.yaml"
    bucket = _env_file(ENV_EXAMPLE)["CHECKPOINT_BUCKET"]
    assert any(arg.startswith(f"storage.path=s3://{bucket}/") for arg in nightly.args)


def test_the_image_can_run_the_example_schedule_without_a_pretrained_folder(tmp_path):
    """The image copies no pretrained/ folder, and needs none: the nightly sweep's recipes
    name their ImageNet weights (msra:R-50), which the sweep fetches on the cluster, so the
    scheduler accepts the schedule as the image holds it."""
    from orchestration.cluster.schedules import load_schedule_file

    dockerfile = DOCKERFILE.read_text()
    copied = re.findall(r"^COPY\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert not [source for source in copied if source.startswith("pretrained")]
    project = tmp_path / "app"  # what the image's /app holds, and the schedules mount
    for source in copied:
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, project / source, dirs_exist_ok=True)
    shutil.copytree(ROOT / "schedules", project / "schedules")
    schedules = load_schedule_file(project / "schedules" / "schedules.yaml")
    assert [s.name for s in schedules.schedules] == ["nightly-multi-dataset"]
