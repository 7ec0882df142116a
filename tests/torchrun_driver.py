"""Several `mmasr` commands in one torchrun launch (tests/test_distributed.py).

torchrun starts this file on every rank; it joins the process group once (as the commands themselves do
under ``torchrun -m mmasr.cli``) and runs each command line of the JSON list it is given, in order, through
``mmasr.cli.main``: one launch instead of one per command, as each start costs seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmasr import cli
from mmasr.training import distributed


def main(commands_file: str) -> int:
    commands = json.loads(Path(commands_file).read_text())
    with distributed.session("cpu"):
        for argv in commands:
            rc = cli.main(argv)
            if rc:  # leave at once (no barrier the other ranks may never reach): torchrun then stops them
                raise SystemExit(rc)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
