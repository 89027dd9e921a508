"""``python -m hubbub``: the same server and flags as the ``hubbub`` command."""

from hubbub.server import main

main()
