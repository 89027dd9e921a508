"""The package as a user installs it: a wheel built from this checkout, installed into a fresh virtual
environment in a directory that holds a ``core.py`` of the user's own, then ``hubbub --help``,
``python -m hubbub --help`` and a short chat exchange with the installed ``hubbub`` command.

The wheel is built as pip builds any sdist (an isolated build environment with setuptools, which
``pip install -e .`` already fetched). Its dependencies come from this test run's environment (a
``.pth`` line in the new venv points at its site-packages), so nothing more is downloaded; hubbub
itself comes only from the wheel.
"""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
from websockets.sync.client import connect

from tests.servers import ROOT

LISTENING = re.compile(r"hubbub listening on ws://([^:]+):(\d+)")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    [built] = out.glob("hubbub-*.whl")
    return built


def test_the_wheel_installs_one_top_level_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"hubbub"}, top
    assert "hubbub/handlers/static/index.html" in names  # the demo page travels with the code
    assert "hubbub/handlers/static/hubbub.js" in names  # and the JavaScript client
    assert "hubbub/core.py" in names and "hubbub/__main__.py" in names
    [entry_points] = [n for n in names if n.endswith("entry_points.txt")]
    with zipfile.ZipFile(wheel) as archive:
        assert "hubbub = hubbub.server:main" in archive.read(entry_points).decode()


def test_installed_beside_a_users_own_core_py_it_serves_chat(wheel: Path, tmp_path: Path) -> None:
    project = tmp_path / "myproject"
    project.mkdir()
    (project / "core.py").write_text("MINE = True  # the user's own module, named like hubbub's used to be\n")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=120)
    # the dependencies (wsproto, anyio, ...) from this environment, behind the venv's own site-packages
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "outer-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {**os.environ, "PYTHONPATH": "", "HUBBUB_STORE": "memory"}

    installed = subprocess.run(
        [str(python), "-c", "import core, hubbub.core, hubbub; print(core.MINE, hubbub.core.__file__)"],
        cwd=project, env=env, check=True, capture_output=True, text=True,
    ).stdout.split()
    assert installed[0] == "True"  # the user's core.py is the user's
    assert installed[1].startswith(purelib)  # and hubbub's core is the installed one, not this checkout's

    for command in ([str(venv / "bin" / "hubbub"), "--help"], [str(python), "-m", "hubbub", "--help"]):
        shown = subprocess.run(command, cwd=project, env=env, check=True, capture_output=True, text=True, timeout=60)
        assert "usage: hubbub" in shown.stdout and "--max-connections" in shown.stdout

    server = subprocess.Popen([str(venv / "bin" / "hubbub"), "--port", "0"], cwd=project, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        found = threading.Event()
        address: list[str] = []

        def read() -> None:
            assert server.stdout is not None
            for line in server.stdout:
                match = LISTENING.search(line)
                if match and not found.is_set():
                    address.append(f"ws://{match.group(1)}:{match.group(2)}")
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        assert found.wait(30), "the installed hubbub did not start"
        with connect(f"{address[0]}/chat/wheel?user=alice") as alice, \
                connect(f"{address[0]}/chat/wheel?user=bob") as bob:
            alice.send(json.dumps({"event": "message", "text": "from the wheel", "ref": 1}))
            assert json.loads(bob.recv(timeout=10))["text"] == "from the wheel"
            assert json.loads(alice.recv(timeout=10))["event"] == "ack"
    finally:
        server.terminate()
        assert server.wait(15) == 0
