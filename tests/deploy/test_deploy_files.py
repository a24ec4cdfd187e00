"""The deployment files, checked without a Docker engine: the Dockerfiles, docker-compose.yml (and
its GPU override), .dockerignore, Prometheus' scrape config and Grafana's provisioning agree with
each other and with the service's settings. The dashboard's metric names are checked against a
live /metrics in test_prometheus.py, which imports the helpers below."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from app.server import uvicorn_shutdown_timeout
from app.settings import Settings
from app.tasks.base import tasks

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile", "gpu": ROOT / "docker" / "Dockerfile.gpu"}
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker" / "compose.gpu.yml"
PROMETHEUS = ROOT / "docker" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tokenlean.json"
SERVICE = "tokenlean"  # the compose service Prometheus scrapes
TASKS = ("vqa", "retrieval", "classify")


# ---------------------------------------------------------------- Dockerfile parsing


@dataclass
class Instruction:
    cmd: str  # upper case
    args: str  # continuation lines joined, comments removed
    stage: int  # index of the FROM it belongs to; -1 before the first FROM

    def flags(self) -> dict[str, str]:
        return dict(re.findall(r"--([a-z-]+)=(\S+)", self.args))

    def words(self) -> list[str]:
        """Arguments without --flags; the JSON (exec) form or shell words."""
        rest = re.sub(r"^(\s*--[a-z-]+=\S+)+", "", self.args).strip()
        if rest.startswith("["):
            return json.loads(rest)
        return shlex.split(rest)


def parse_dockerfile(path: Path) -> list[Instruction]:
    instructions, stage, pending = [], -1, ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # comments (and parser directives) vanish, even mid-command
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line, pending = pending + line, ""
        cmd, _, args = line.partition(" ")
        cmd = cmd.upper()
        if cmd == "FROM":
            stage += 1
        instructions.append(Instruction(cmd, args.strip(), stage))
    assert not pending, f"{path}: file ends inside a line continuation"
    return instructions


@dataclass
class Dockerfile:
    path: Path
    instructions: list[Instruction]

    def stage_names(self) -> list[str]:
        names = []
        for ins in self.of("FROM"):
            words = ins.words()
            names.append(words[2] if len(words) == 3 and words[1].upper() == "AS" else "")
        return names

    @property
    def final(self) -> int:
        return max(i.stage for i in self.instructions)

    def of(self, cmd: str, stage: int | None = None) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd and (stage is None or i.stage == stage)]

    def args(self) -> dict[str, str]:
        """ARG defaults (global and per stage; names are unique in our files)."""
        out = {}
        for ins in self.of("ARG"):
            name, _, default = ins.args.partition("=")
            out[name] = default
        return out

    def substitute(self, text: str) -> str:
        args = self.args()
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)

    def env(self, stage: int) -> dict[str, str]:
        out = {}
        for ins in self.of("ENV", stage):
            for word in shlex.split(ins.args):
                assert "=" in word, f"{self.path}: use ENV KEY=VALUE ({ins.args})"
                key, _, value = word.partition("=")
                out[key] = value
        return out

    def copies(self, stage: int) -> list[tuple[list[str], str, dict[str, str]]]:
        """(sources, destination, flags) of every COPY/ADD of a stage."""
        out = []
        for ins in self.of("COPY", stage) + self.of("ADD", stage):
            words = ins.words()
            out.append((words[:-1], words[-1], ins.flags()))
        return out

    def workdir(self, stage: int, before: Instruction) -> str:
        wd = "/"
        for ins in self.instructions:
            if ins is before:
                break
            if ins.stage == stage and ins.cmd == "WORKDIR":
                wd = str(PurePosixPath(wd) / ins.args)
        return wd


def load_dockerfile(kind: str) -> Dockerfile:
    return Dockerfile(DOCKERFILES[kind], parse_dockerfile(DOCKERFILES[kind]))


# ---------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):  # any number of directories, none included
            out, i = out + "(?:.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        c = pattern[i]
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]"
            i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_rules(path: Path = ROOT / ".dockerignore") -> list[tuple[bool, re.Pattern]]:
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = str(PurePosixPath(pattern.strip("/")))
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def excluded(relpath: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = PurePosixPath(relpath).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            verdict = not negate
    return verdict


def test_dockerignore_matcher_follows_dockers_rules():
    rules = [(False, _pattern_regex("*")), (True, _pattern_regex("app")), (False, _pattern_regex("**/x.pyc"))]
    assert excluded("tests/a.py", rules) and excluded(".venv/bin/python", rules)
    assert not excluded("app/a.py", rules) and not excluded("app", rules)
    assert excluded("app/x.pyc", rules) and excluded("app/sub/x.pyc", rules)


def test_dockerignore_keeps_the_context_to_what_images_copy():
    rules = dockerignore_rules()
    for path in (
        ".venv/bin/python",
        ".git/config",
        "tests/service/test_server.py",
        "bench/results/bench.json",
        ".env",
    ):
        assert excluded(path, rules), f"{path} would be sent to the Docker daemon"
    for path in ("app/__pycache__/main.cpython-311.pyc", "models/__pycache__/plan.cpython-311.pyc"):
        assert excluded(path, rules)
    for path in ("pyproject.toml", "models/checkpoints/vqa/model.safetensors", "app/main.py", "bench/cli.py"):
        assert not excluded(path, rules), f"{path} is needed by the images"


# ---------------------------------------------------------------- settings helpers


def setting_for(variable: str) -> str:
    """The dotted Settings field a TOKENLEAN_* variable sets; fails for a variable nothing reads.
    A dict of models (the per-task table) takes a registered task name as its key."""
    assert variable.startswith("TOKENLEAN_"), variable
    model: type[BaseModel] = Settings
    parts = variable.removeprefix("TOKENLEAN_").lower().split("__")
    i = 0
    while i < len(parts):
        part = parts[i]
        assert part in model.model_fields, f"{variable}: Settings has no field {'.'.join(parts[: i + 1])}"
        annotation = model.model_fields[part].annotation
        if get_origin(annotation) is dict:
            i += 1
            assert i < len(parts) and parts[i] in tasks(), f"{variable}: {parts[i:]} names no task"
            annotation = get_args(annotation)[1]
        if i < len(parts) - 1:
            assert isinstance(annotation, type) and issubclass(annotation, BaseModel), variable
            model = annotation
        i += 1
    return ".".join(parts)


def effective_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as the service builds them from exactly these TOKENLEAN_* variables."""
    for key in list(os.environ):
        if key.startswith("TOKENLEAN_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("TOKENLEAN_"):
            monkeypatch.setenv(key, value)
    return Settings()


def image_env(kind: str) -> dict[str, str]:
    df = load_dockerfile(kind)
    return df.env(df.final)


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def container_path_to_repo(path: str, kind: str = "cpu") -> Path | None:
    """Where a path of the final image comes from in the repository (via its COPY lines)."""
    df = load_dockerfile(kind)
    for sources, dest, flags in df.copies(df.final):
        if "from" in flags or len(sources) != 1:
            continue
        if path == dest or path.startswith(dest.rstrip("/") + "/"):
            return ROOT / sources[0] / PurePosixPath(path).relative_to(dest)
    return None


def service_process_env(port: int) -> dict[str, str]:
    """The TOKENLEAN_* environment the CPU container runs with (image ENV + compose), for a
    process on this machine: loopback only, the given port, checkpoints at their repo paths."""
    env = {k: v for k, v in image_env("cpu").items() if k.startswith("TOKENLEAN_")}
    env.update(
        {k: v for k, v in compose_env(compose()["services"][SERVICE]).items() if k.startswith("TOKENLEAN_")}
    )
    for key, value in env.items():
        if key.endswith("__CHECKPOINT") and (repo := container_path_to_repo(value)) is not None:
            env[key] = str(repo)
    env["TOKENLEAN_HOST"], env["TOKENLEAN_PORT"] = "127.0.0.1", str(port)
    return env


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_is_multi_stage_and_runs_as_non_root(kind):
    df = load_dockerfile(kind)
    names = df.stage_names()
    assert len(names) >= 2 and all(names), f"named stages: {names}"
    for _, _, flags in df.copies(df.final):
        if "from" in flags:
            assert flags["from"] in names[: df.final], f"COPY --from={flags['from']}: no earlier stage"
    assert any("from" in flags for _, _, flags in df.copies(df.final)), "the final stage copies a build stage"
    for ins in df.of("FROM"):
        image = df.substitute(ins.words()[0])
        assert "$" not in image and ":" in image and not image.endswith(":latest"), f"unpinned base {image}"
    users = df.of("USER", df.final)
    assert users, "the final stage sets USER"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0") and (not user.isdigit() or int(user) > 0)
    last_user = df.instructions.index(users[-1])
    assert all(i.cmd != "RUN" for i in df.instructions[last_user:]), "USER comes after the last RUN"
    creates = " ".join(i.args for i in df.of("RUN", df.final))
    assert re.search(rf"useradd\b.*--uid {user}\b", creates), f"user {user} is created in the image"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_copies_exist_in_the_context_and_cover_the_package(kind):
    df = load_dockerfile(kind)
    rules = dockerignore_rules()
    copied: set[str] = set()
    for stage in range(df.final + 1):
        for sources, _, flags in df.copies(stage):
            if "from" in flags:
                continue
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert not excluded(source, rules), f"COPY {source}: excluded by .dockerignore"
                copied.add(source.rstrip("/"))
    # Everything `pip install .` needs: pyproject, its readme and every package it declares.
    project = pyproject()
    find = project["tool"]["setuptools"]["packages"]["find"]
    packages = {p.split("*")[0].rstrip(".") for p in find["include"]}
    needed = {"pyproject.toml", project["project"]["readme"], *packages}
    assert needed <= copied, f"not copied into the build: {needed - copied}"
    for package in packages:
        assert (ROOT / package / "__init__.py").exists()


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_configuration_agrees_with_the_settings(kind, monkeypatch):
    df = load_dockerfile(kind)
    env = df.env(df.final)
    for variable in env:
        if variable.startswith("TOKENLEAN_"):
            setting_for(variable)
    settings = effective_settings(env, monkeypatch)
    assert settings.host == "0.0.0.0", "the service must listen beyond the container's loopback"
    exposed = [int(p.split("/")[0]) for i in df.of("EXPOSE", df.final) for p in i.args.split()]
    assert exposed == [settings.port]
    assert settings.device == ("cuda" if kind == "gpu" else "cpu")
    # The demo checkpoints are baked in and every task points at its copy.
    for task in TASKS:
        checkpoint = settings.models[task].checkpoint
        assert checkpoint.startswith("/"), f"{task}: {checkpoint}"
        repo = container_path_to_repo(checkpoint, kind)
        assert repo is not None, f"{task}: {checkpoint} is not copied into the image"
        assert (repo / "config.json").is_file() and (repo / "model.safetensors").is_file(), repo
        assert repo.resolve().is_relative_to(ROOT / "models" / "checkpoints")


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_entrypoint_and_healthcheck(kind):
    df = load_dockerfile(kind)
    [entry] = df.of("ENTRYPOINT", df.final)
    assert entry.args.startswith("["), "exec form, so the server is PID 1 and gets SIGTERM"
    assert entry.words() == ["tokenlean", "serve"]
    assert pyproject()["project"]["scripts"]["tokenlean"] == "app.cli:main"
    # Configuration by environment only: no CMD flags, no config file in the image.
    assert all(i.words() == [] for i in df.of("CMD", df.final))
    for sources, _, flags in df.copies(df.final):
        assert "from" in flags or sources in (["models/checkpoints"], ["docker/healthcheck.py"]), sources
    [health] = df.of("HEALTHCHECK", df.final)
    flags = health.flags()
    assert {"interval", "timeout", "start-period", "retries"} <= set(flags)
    command = re.sub(r"^(\s*--[a-z-]+=\S+)+", "", health.args).strip()
    assert command.startswith("CMD [")
    words = json.loads(command.removeprefix("CMD").strip())
    assert words[0] == "python"
    script = container_path_to_repo(words[1], kind)
    assert script == ROOT / "docker" / "healthcheck.py"
    text = script.read_text()
    assert '"/readyz"' in text or "/readyz" in text
    assert 'os.environ.get("TOKENLEAN_PORT", "8000")' in text
    assert Settings.model_fields["port"].default == 8000  # the script's fallback is the settings' default


def test_cpu_image_installs_cpu_torch_pinned_like_pyproject():
    df = load_dockerfile("cpu")
    runs = [df.substitute(i.args) for i in df.of("RUN")]
    torch_pin = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("torch"))
    torch_runs = [r for r in runs if "torch==" in r and "pip install" in r]
    assert torch_runs, "torch is installed explicitly"
    assert torch_pin.replace(" ", "") in torch_runs[0]
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_runs[0]
    assert any("onnxruntime" in r and "onnxruntime-gpu" not in r for r in runs)


def test_gpu_image_installs_cuda_torch_and_onnxruntime_gpu():
    df = load_dockerfile("gpu")
    runs = [df.substitute(i.args) for i in df.of("RUN")]
    assert "nvidia/cuda:" in df.substitute(df.of("FROM")[-1].words()[0])
    assert "runtime" in df.substitute(df.of("FROM")[-1].words()[0])
    torch_pin = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("torch"))
    torch_runs = [r for r in runs if "torch==" in r and "pip install" in r]
    assert torch_runs and torch_pin.replace(" ", "") in torch_runs[0]
    assert "whl/cpu" not in " ".join(runs)
    joined = " && ".join(runs)
    uninstall = joined.find("pip uninstall -y onnxruntime")
    install = joined.find("onnxruntime-gpu==")
    assert 0 <= uninstall < install, "onnxruntime goes before onnxruntime-gpu comes (same module)"
    assert re.search(r'pip install "?\.\[gpu\]', joined), "the gpu extra (NVML)"
    assert "gpu" in pyproject()["project"]["optional-dependencies"]


# ---------------------------------------------------------------- compose


def compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def container_port(mapping: str) -> tuple[int | None, int]:
    """'8000:8000', '127.0.0.1:8000:8000/tcp' or '8000' -> (host port, container port)."""
    parts = str(mapping).split("/")[0].split(":")
    return (int(parts[-2]) if len(parts) > 1 else None), int(parts[-1])


def bind_mounts(service: dict) -> dict[str, str]:
    """container path -> source of every short-syntax volume."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def test_compose_builds_the_images_and_every_referenced_file_exists():
    doc = compose()
    services = doc["services"]
    assert {SERVICE, "prometheus", "grafana"} <= set(services)
    build = services[SERVICE]["build"]
    assert (ROOT / build["context"]).resolve() == ROOT
    assert ROOT / build["dockerfile"] == DOCKERFILES["cpu"]
    named = set(doc.get("volumes") or {})
    for name, service in services.items():
        image = service.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image, f"{name}: pin the image ({image})"
        for source in bind_mounts(service).values():
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named, f"{name}: volume {source} is not declared"


def test_compose_port_and_environment_agree_with_the_image(monkeypatch):
    service = compose()["services"][SERVICE]
    env = {**image_env("cpu"), **compose_env(service)}
    for variable in compose_env(service):
        if variable.startswith("TOKENLEAN_"):
            setting_for(variable)
    settings = effective_settings(env, monkeypatch)
    ports = [container_port(p) for p in service["ports"]]
    assert [c for _, c in ports] == [settings.port]
    assert ports[0][0] is not None, "the service port is published"
    # A graceful stop (queued requests finish, uploads still under way are cut off last) fits in
    # the grace period.
    grace = service["stop_grace_period"]
    assert re.fullmatch(r"\d+s", grace)
    assert int(grace[:-1]) > uvicorn_shutdown_timeout(settings)


def test_compose_gpu_override_reserves_an_nvidia_device():
    override = compose(COMPOSE_GPU)
    # The same service name: Prometheus, Grafana and the published port stay as they are.
    assert set(override["services"]) == {SERVICE}
    service = override["services"][SERVICE]
    # Paths in an override file are relative to the first file's folder (the repository root).
    assert (ROOT / service["build"]["context"]).resolve() == ROOT
    assert ROOT / service["build"]["dockerfile"] == DOCKERFILES["gpu"]
    assert service["image"] != compose()["services"][SERVICE]["image"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("count", 1) >= 1 for d in devices
    )


DOCKER_COMPOSE = shutil.which("docker-compose")


@pytest.mark.skipif(
    not DOCKER_COMPOSE,
    reason="docker-compose not found: install Debian's `docker-compose` package (.ci/run does)",
)
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu-override"])
def test_compose_files_pass_docker_compose_config(gpu, tmp_path):
    """Compose's own schema check and merge (`config` needs no engine): the override keeps the
    repository root as build context and swaps the Dockerfile."""
    files = [COMPOSE, COMPOSE_GPU] if gpu else [COMPOSE]
    command = [DOCKER_COMPOSE, *(a for f in files for a in ("-f", str(f))), "config"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no COMPOSE_*/DOCKER_* from the caller
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    service = yaml.safe_load(result.stdout)["services"][SERVICE]
    assert Path(service["build"]["context"]).resolve() == ROOT
    assert ROOT / service["build"]["dockerfile"] == DOCKERFILES["gpu" if gpu else "cpu"]
    assert ("deploy" in service) == gpu


def prometheus_config() -> dict:
    return yaml.safe_load(PROMETHEUS.read_text())


def scrape_job(config: dict) -> dict:
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == SERVICE]
    return job


def test_prometheus_scrapes_the_service_by_name_and_port(monkeypatch):
    services = compose()["services"]
    prometheus = services["prometheus"]
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    assert bind_mounts(prometheus)[config_flag.split("=", 1)[1]].removeprefix("./") == str(
        PROMETHEUS.relative_to(ROOT)
    )
    port = effective_settings({**image_env("cpu"), **compose_env(services[SERVICE])}, monkeypatch).port
    job = scrape_job(prometheus_config())
    [static] = job["static_configs"]
    assert static["targets"] == [f"{SERVICE}:{port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scheme", "http") == "http"


# ---------------------------------------------------------------- Grafana


def grafana_provisioning(kind: str) -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted((GRAFANA / "provisioning" / kind).glob("*.yml"))]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_grafana_provisioning_is_mounted_and_points_at_prometheus():
    services = compose()["services"]
    mounts = {
        target: source.removeprefix("./") for target, source in bind_mounts(services["grafana"]).items()
    }
    assert mounts["/etc/grafana/provisioning"] == "docker/grafana/provisioning"
    [datasources] = grafana_provisioning("datasources")
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    prometheus_port = container_port(services["prometheus"]["ports"][0])[1]
    assert source["url"] == f"http://prometheus:{prometheus_port}"
    # Grafana's $__rate_interval spans at least four scrapes when it knows the scrape interval.
    assert source["jsonData"]["timeInterval"] == prometheus_config()["global"]["scrape_interval"]
    [dashboards] = grafana_provisioning("dashboards")
    [provider] = dashboards["providers"]
    assert provider["type"] == "file"
    folder = provider["options"]["path"]
    assert mounts[folder] == str(DASHBOARD.parent.relative_to(ROOT))
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{folder}/{DASHBOARD.name}"


def panels(board: dict) -> list[dict]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_expressions(board: dict | None = None) -> list[str]:
    board = board or dashboard()
    return [t["expr"] for p in panels(board) for t in p.get("targets", []) if t.get("expr")]


def test_dashboard_is_well_formed_and_covers_the_issue():
    board = dashboard()
    assert board["uid"] == "tokenlean" and board["title"] == "tokenlean"
    [datasources] = grafana_provisioning("datasources")
    uid = datasources["datasources"][0]["uid"]
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in panels(board):
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        mine = {
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid and panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == uid and target["expr"], panel["title"]
    for var in board["templating"]["list"]:
        assert var["datasource"]["uid"] == uid
    exprs = dashboard_expressions(board)
    joined = "\n".join(exprs)
    assert "tokenlean_requests_total" in joined
    for q in ("0.5", "0.95", "0.99"):
        expr = f"histogram_quantile({q}, sum by (le, task, level) "
        expr += "(rate(tokenlean_request_duration_seconds_bucket"
        assert expr in joined, f"latency p{q} per task and level"
    for needed in (
        "tokenlean_queue_depth",
        "tokenlean_batch_size_",
        "tokenlean_tokens_kept_ratio_",
        "tokenlean_gpu_memory_",
        'status=~"4..|5.."',  # status is the code: 4xx and 5xx are regexes over it
        'method=~"$method"',
    ):
        assert needed in joined, needed
    assert "4xx" not in joined and "5xx" not in joined, "status classes are not label values"


# PromQL words that are not metric names.
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}
PROMQL_KEYWORDS |= {"bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a Grafana label_values() query)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word, rest = m[0], expr[m.end() :].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_KEYWORDS or word.startswith("$"):
            continue
        if expr[m.start() - 1 : m.start()] == "$":  # Grafana variables
            continue
        if re.fullmatch(r"\d*e\d*", word):
            continue
        names.add(word)
    return names


def dashboard_metric_names(board: dict | None = None) -> set[str]:
    board = board or dashboard()
    names = set().union(*(metric_names(e) for e in dashboard_expressions(board)))
    for var in board["templating"]["list"]:
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["definition"])
        assert m, var["definition"]
        names |= metric_names(m[1])
    return names


def test_metric_name_extraction():
    expr = (
        "histogram_quantile(0.95, sum by (le, task) "
        '(rate(a_bucket{task=~"$task", x="y(z)"}[$__rate_interval])))'
        " / on (task) group_left sum without (level) (b_total) + 1e3 * c"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert {"tokenlean_requests_total", "tokenlean_queue_depth"} <= dashboard_metric_names()
