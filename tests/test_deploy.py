"""deploy/: the Dockerfile and the systemd unit, checked as far as a machine without a Docker daemon or a
running systemd can.

- The Dockerfile's steps are carried out in a fresh virtual environment: its COPY sources copied into a
  build context of their own, its ``pip install`` run there (with ``--no-deps``: the dependencies come
  from this test run's environment through a ``.pth`` line, and the build's setuptools as pip fetches
  it for any sdist, as in test_wheel.py), then its ENTRYPOINT started with its ENV (ports and the
  SQLite path moved to free ones), and its HEALTHCHECK command run as Docker would: 0 while hubbub is
  up, alone or with ``--workers`` and ``--allowed-hosts``, and not 0 once it is gone. The base image,
  ``useradd`` and ``USER`` are not run: they are read (a non-root user, created before it is used).
- The unit is read as systemd reads it (sections, repeated keys), and its settings checked; every
  ``HUBBUB_*`` name either file mentions is a real flag of ``hubbub``. (``systemd-analyze verify`` was
  run by hand, ``docker build`` could not be: see the README's "Deploying".)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import site
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hubbub.server import build_parser
from tests.servers import ROOT

DEPLOY = ROOT / "deploy"
LISTENING = re.compile(r"hubbub listening on ws://")


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def one(word: str) -> str:
    [value] = [rest for w, rest in instructions() if w == word]
    return value


def flag_names() -> set[str]:
    """HUBBUB_<NAME> for every flag of the parser."""
    return {"HUBBUB_" + action.dest.upper() for action in build_parser()._actions if action.dest != "help"}


def test_the_image_is_python_311_slim_run_by_a_user_it_creates_not_root() -> None:
    steps = instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    [user] = [i for i, (w, _) in enumerate(steps) if w == "USER"]
    name = steps[user][1]
    assert name not in ("root", "0") and not name.startswith("0:")
    [create] = [i for i, (w, rest) in enumerate(steps) if w == "RUN" and "useradd" in rest]
    assert create < user and shlex.split(steps[create][1])[-1] == name
    install = next(i for i, (w, rest) in enumerate(steps) if w == "RUN" and "pip install" in rest)
    assert install < user  # installed as root into the image's Python, run as the user


def test_the_entry_point_is_the_hubbub_command_and_the_healthcheck_asks_healthz() -> None:
    assert json.loads(one("ENTRYPOINT")) == ["hubbub"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["hubbub"] == "hubbub.server:main"
    health = one("HEALTHCHECK")
    assert "/healthz" in health and "HUBBUB_METRICS_PORT" in health
    assert "HUBBUB_METRICS_PORT" in docker_env()  # the port the healthcheck asks is one hubbub serves
    assert one("STOPSIGNAL") == "SIGTERM"


def test_every_hubbub_setting_the_deploy_files_name_is_a_real_flag() -> None:
    flags = flag_names()
    for path in (DEPLOY / "Dockerfile", DEPLOY / "hubbub.service"):
        named = set(re.findall(r"\bHUBBUB_[A-Z_]+", path.read_text()))
        assert named, path
        assert named <= flags, (path.name, named - flags)


def test_the_dockerfile_installs_extras_that_exist_from_sources_that_exist() -> None:
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for word, rest in instructions():
        if word == "COPY":
            *sources, _ = shlex.split(rest)
            assert all((ROOT / source).exists() for source in sources), sources
        if word == "RUN" and "pip install" in rest:
            [extras] = re.findall(r"\.\[([a-z,]+)\]", rest)
            assert set(extras.split(",")) <= set(optional), extras


# -- the Dockerfile's steps, in a venv ------------------------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv that went through the Dockerfile's COPY and RUN pip install steps: its bin directory."""
    root = tmp_path_factory.mktemp("image")
    context = root / "build"
    context.mkdir()
    for word, rest in instructions():
        if word == "COPY":
            *sources, _ = shlex.split(rest)
            for source in sources:
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, context / source,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy2(ROOT / source, context / source)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    [purelib] = (venv / "lib").glob("python3*/site-packages")
    (purelib / "_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    [install] = [rest for w, rest in instructions() if w == "RUN" and "pip install" in rest]
    [target] = re.findall(r"'(\.\[[a-z,]+\])'", install)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-compile", target],
        cwd=context, check=True, capture_output=True, text=True, timeout=300,
    )
    shutil.rmtree(context)  # as the Dockerfile does: the installed package must not need its sources
    assert (venv / "bin" / "hubbub").is_file()
    return venv / "bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def container(bin_dir: Path, tmp: Path, **settings: str) -> Iterator[dict[str, str]]:
    """The ENTRYPOINT with the Dockerfile's ENV (free ports, the state directory in ``tmp``) and ``settings``."""
    env = {**os.environ, **docker_env(), "HUBBUB_HOST": "127.0.0.1", "HUBBUB_PORT": str(free_port()),
           "HUBBUB_METRICS_PORT": str(free_port()), **settings}
    env["HUBBUB_STORE"] = env["HUBBUB_STORE"].replace("/var/lib/hubbub", str(tmp))
    entry = json.loads(one("ENTRYPOINT"))
    process = subprocess.Popen([str(bin_dir / entry[0]), *entry[1:]], cwd=tmp, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    listening = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if LISTENING.search(line):
                listening.set()
        listening.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert listening.wait(120) and process.poll() is None, "".join(output)
        yield env
    finally:
        process.terminate()
        assert process.wait(30) == 0, "".join(output)


def healthcheck(bin_dir: Path, env: dict[str, str]) -> int:
    """The HEALTHCHECK's CMD, run as Docker runs it (exec form, the image's PATH first)."""
    health = one("HEALTHCHECK")
    argv = json.loads(health[health.index("CMD") + 3 :].strip())
    assert argv[0] == "python"
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
    return subprocess.run([str(bin_dir / "python"), *argv[1:]], env=env, capture_output=True,
                          timeout=30).returncode


def until_healthy(bin_dir: Path, env: dict[str, str]) -> None:
    """Docker's --start-period: the first checks may fail while the workers and the broker come up."""
    deadline = time.monotonic() + 120  # generous: a loaded CI machine, not a measure
    while healthcheck(bin_dir, env) != 0:
        assert time.monotonic() < deadline, "the healthcheck never passed"
        time.sleep(0.25)


@pytest.mark.parametrize("settings", [
    {},
    {"HUBBUB_ALLOWED_HOSTS": "*.example.com"},
    {"HUBBUB_WORKERS": "2", "HUBBUB_ALLOWED_HOSTS": "chat.example.com"},
], ids=["one-process", "allowed-hosts", "workers-and-allowed-hosts"])
def test_the_dockerfile_steps_in_a_venv_serve_and_pass_the_healthcheck(
    image: Path, tmp_path: Path, settings: dict[str, str]
) -> None:
    with container(image, tmp_path, **settings) as env:
        until_healthy(image, env)
    assert healthcheck(image, env) != 0  # nobody answers: unhealthy
    assert (tmp_path / "hubbub.db").exists()  # the store is the Dockerfile's, in the state directory


# -- the systemd unit -----------------------------------------------------------------------------


def unit() -> dict[str, dict[str, list[str]]]:
    """The unit file as systemd reads it: sections of keys, each with every value it was given."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in (DEPLOY / "hubbub.service").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), line
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, line
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_the_systemd_unit_runs_hubbub_unprivileged_restarts_it_and_stops_it_with_sigterm() -> None:
    sections = unit()
    assert set(sections) == {"Unit", "Service", "Install"}
    service = {key: values[-1] for key, values in sections["Service"].items()}
    assert service["User"] not in ("root", "0") and service["Group"] not in ("root", "0")
    assert Path(shlex.split(service["ExecStart"])[0]).name == "hubbub"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"  # the parent forwards it
    assert "-HUP" in service["ExecReload"]  # systemctl reload: the certificate read again
    assert service["EnvironmentFile"].lstrip("-").startswith("/etc/hubbub/")
    assert service["NoNewPrivileges"] == "true" and service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""
    assert service["StateDirectory"] == "hubbub"  # the SQLite file's directory, the only writable one
    store = next(v for v in sections["Service"]["Environment"] if v.startswith("HUBBUB_STORE="))
    assert store == "HUBBUB_STORE=sqlite:////var/lib/hubbub/hubbub.db"
    assert int(service["LimitNOFILE"]) > 20000
    assert sections["Install"]["WantedBy"] == ["multi-user.target"]
