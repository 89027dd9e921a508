"""The README's limits table is core.Config, rendered; this test keeps the two in step.

Regenerate after changing a limit: ``python -m tests.test_readme``.
"""

from __future__ import annotations

import dataclasses

from hubbub import core
from tests.servers import ROOT

START = "<!-- limits-table: generated from core.Config; tests/test_readme.py checks it -->"
END = "<!-- /limits-table -->"
# flags of their own, or not a flag
SHELL_ONLY = {"compression", "allowed_origins", "allowed_hosts", "node", "codec", "read_only_rooms"}


def limits_table() -> str:
    rows = []
    for f in dataclasses.fields(core.Config):
        if f.name in SHELL_ONLY:
            continue
        flag = "--" + f.name.replace("_", "-")
        rows.append(f"| `{flag}` | {f.default!r} | {f.metadata['help']} |")
    return "\n".join(rows)


def current_block() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split(START, 1)[1].split(END, 1)[0].strip("\n")


def test_readme_limits_table_matches_config() -> None:
    assert current_block() == limits_table(), "README limits table is stale: run python -m tests.test_readme"


if __name__ == "__main__":
    path = ROOT / "README.md"
    text = path.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{limits_table()}\n{END}{tail}")
