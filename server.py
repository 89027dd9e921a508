"""``python server.py`` from a checkout: the same server and flags as the installed ``hubbub`` command.

The code lives in the ``hubbub`` package beside this file (``hubbub/server.py``, ``hubbub/core.py``).
"""

from hubbub.server import main

if __name__ == "__main__":
    main()
