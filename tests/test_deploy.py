"""``deploy/``: every manifest parses and agrees with the server it deploys (ports,
probe paths that answer, drain times), and nginx accepts its config where nginx is
installed."""

from __future__ import annotations

import asyncio
import configparser
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import yaml
from test_server import http_get, running_server, server_config

from mmchat.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DEFAULTS = ServerConfig()


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s() -> dict[str, dict]:
    return {d["kind"]: d for p in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for d in _documents(p) if "kind" in d and d["kind"] != "Kustomization"}


def test_every_yaml_file_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        documents = _documents(path)
        assert documents and all(isinstance(d, dict) for d in documents), path


def test_kustomization_lists_every_manifest():
    listed = set(_documents(DEPLOY / "k8s" / "kustomization.yaml")[0]["resources"])
    assert listed == {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {
        "kustomization.yaml"}


def test_compose_runs_redis_two_replicas_and_nginx():
    compose = _documents(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    assert set(services) == {"redis", "mmchat", "nginx"}
    mmchat = services["mmchat"]
    assert mmchat["deploy"]["replicas"] == 2
    assert mmchat["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    env = mmchat["environment"]
    assert env["MMCHAT_SESSIONS__BACKEND"] == "redis"
    assert urllib.parse.urlsplit(env["MMCHAT_SESSIONS__URL"]).hostname == "redis"
    assert mmchat["depends_on"]["redis"]["condition"] == "service_healthy"
    assert int(mmchat["stop_grace_period"].rstrip("s")) > DEFAULTS.drain_seconds
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
    assert any("/readyz" in part for part in mmchat["healthcheck"]["test"])
    nginx = services["nginx"]
    source, target, _ = nginx["volumes"][0].split(":")
    assert (DEPLOY / source).resolve() == DEPLOY / "nginx" / "nginx.conf"
    assert target == "/etc/nginx/nginx.conf"
    assert nginx["depends_on"]["mmchat"]["condition"] == "service_healthy"


def test_kubernetes_manifests_fit_together():
    k8s = _k8s()
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "StatefulSet", "ConfigMap"} <= set(k8s)
    deployment = k8s["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port = container["ports"][0]
    assert port["containerPort"] == DEFAULTS.port
    assert container["args"][:2] == ["mmchat", "serve"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in (port["name"], port["containerPort"])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > DEFAULTS.drain_seconds + 5  # drain plus the preStop pause
    service = k8s["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in (port["name"], port["containerPort"])
    hpa = k8s["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["minReplicas"] >= 2
    assert k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    env = k8s["ConfigMap"]["data"]
    redis_host = urllib.parse.urlsplit(env["MMCHAT_SESSIONS__URL"]).hostname
    redis_names = {d["metadata"]["name"] for d in _documents(DEPLOY / "k8s" / "redis.yaml")}
    assert redis_host in redis_names and env["MMCHAT_SESSIONS__BACKEND"] == "redis"
    assert k8s["StatefulSet"]["spec"]["volumeClaimTemplates"]


async def test_probe_paths_answer_on_a_real_server():
    container = _k8s()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    paths = {container[p]["httpGet"]["path"]
             for p in ("startupProbe", "livenessProbe", "readinessProbe")}
    compose = _documents(DEPLOY / "compose.yaml")[0]["services"]
    for part in compose["mmchat"]["healthcheck"]["test"]:
        paths |= set(re.findall(r"http://[^/'\"]+(/[\w/]*)", part))
    assert {"/healthz", "/readyz"} <= paths
    async with running_server() as server:
        for path in sorted(paths):
            status, _, _ = await asyncio.to_thread(
                http_get, f"http://127.0.0.1:{server.port}{path}")
            assert status == 200, path


def test_dockerfile_serves_on_cpu_torch():
    text = (DEPLOY / "Dockerfile").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "FROM python:3.11-slim" in code
    assert "--index-url https://download.pytorch.org/whl/cpu" in code
    assert f"EXPOSE {DEFAULTS.port}" in code and "/healthz" in code
    assert 'CMD ["mmchat", "serve"' in code and "STOPSIGNAL SIGTERM" in code
    assert "espeak" not in code  # only the tests and the demo corpus need it
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


def test_systemd_unit():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string((DEPLOY / "systemd" / "mmchat@.service").read_text())
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    service = unit["Service"]
    assert "mmchat serve" in service["ExecStart"] and "--port %i" in service["ExecStart"]
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > DEFAULTS.drain_seconds
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_nginx_config_upgrades_websockets_and_keeps_them_open():
    text = (DEPLOY / "nginx" / "nginx.conf").read_text()
    for needle in ("proxy_http_version 1.1", "proxy_set_header Upgrade $http_upgrade",
                   "proxy_set_header Connection $connection_upgrade",
                   "proxy_read_timeout 3600s", "location = /healthz",
                   f"mmchat:{DEFAULTS.port}", "proxy_next_upstream error"):
        assert needle in text, needle


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_accepts_the_config(tmp_path):
    result = subprocess.run(
        ["nginx", "-t", "-c", str(DEPLOY / "nginx" / "nginx.conf"), "-p", f"{tmp_path}/"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_deploy_docs_cover_every_file():
    text = (ROOT / "docs" / "deploy.md").read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert path.relative_to(ROOT).as_posix() in text, path


def test_the_bundled_redis_is_capped_and_evicts_whole_sessions_lru():
    """docs/deploy.md, "Sizing and Redis settings": maxmemory set, an LRU policy over
    keys with a TTL (every mmchat key has one), never noeviction."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    statefulset = next(d for d in _documents(DEPLOY / "k8s" / "redis.yaml")
                       if d["kind"] == "StatefulSet")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    for argv in (compose["services"]["redis"]["command"], container["args"]):
        settings = dict(zip(argv[1::2], argv[2::2], strict=True))
        assert settings["--maxmemory-policy"] == "volatile-lru"
        assert settings["--maxmemory"].endswith("mb")


def _nginx_location(text: str, path: str) -> str:
    found = re.search(rf"location {re.escape(path)} \{{(.*?)\n        \}}", text, re.S)
    assert found, f"nginx has no location {path}"
    return found.group(1)


def _size(value: str) -> int:
    units = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
    return int(value[:-1]) * units[value[-1].lower()] if value[-1].isalpha() else int(value)


def test_the_openai_port_is_set_exposed_and_routed_everywhere():
    """One HTTP port (server.http_port) in the image, compose, nginx, Kubernetes; nginx
    routes /v1/ to it unbuffered (server-sent events) with a body limit that fits the
    server's, and keeps /admin/ off the edge; systemd reads a node's own port."""
    docker = (DEPLOY / "Dockerfile").read_text()
    port = int(re.search(r"MMCHAT_SERVER__HTTP_PORT=(\d+)", docker).group(1))
    assert port != DEFAULTS.port
    assert re.search(rf"^EXPOSE .*\b{port}\b", docker, re.M)
    mmchat = _documents(DEPLOY / "compose.yaml")[0]["services"]["mmchat"]
    assert int(mmchat["environment"]["MMCHAT_SERVER__HTTP_PORT"]) == port
    assert str(port) in mmchat["expose"]

    nginx = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert f"set $mmchat_http mmchat:{port};" in nginx
    v1 = _nginx_location(nginx, "/v1/")
    assert "proxy_pass http://$mmchat_http;" in v1 and "proxy_buffering off;" in v1
    body = re.search(r"client_max_body_size (\w+);", v1).group(1)
    assert _size(body) >= DEFAULTS.max_message_bytes
    assert "return 404;" in _nginx_location(nginx, "/admin/")

    k8s = _k8s()
    assert int(k8s["ConfigMap"]["data"]["MMCHAT_SERVER__HTTP_PORT"]) == port
    container = k8s["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in named.values()
    targets = {p["targetPort"] for p in k8s["Service"]["spec"]["ports"]}
    assert any(named.get(t, t) == port for t in targets)

    unit = (DEPLOY / "systemd" / "mmchat@.service").read_text()
    assert "EnvironmentFile=-/etc/mmchat/%i.env" in unit
    assert "MMCHAT_SERVER__HTTP_PORT" in unit


async def test_the_paths_routed_to_the_http_port_answer_there():
    async with running_server(server_config(server={"http_port": 0})) as server:
        for path in ("/v1/models", "/healthz", "/readyz"):
            status, _, _ = await asyncio.to_thread(http_get, server.http_url + path)
            assert status == 200, path
