"""`python -m spin_operator ARGS` is `spin operator ARGS`."""

import sys

from spin_core.cli import app

if __name__ == "__main__":
    app(["operator", *sys.argv[1:]], prog_name="spin")
