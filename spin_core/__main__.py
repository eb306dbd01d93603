"""`python -m spin_core ...` is the same as `spin ...` (used by torchrun and the local runner)."""

from spin_core.cli import app

if __name__ == "__main__":
    app()
