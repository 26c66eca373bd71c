"""Helpers for the tests that run the toolkit's scripts as subprocesses, as a user would."""
from conftest import run_script

# One thread per process: on a shared 2-core machine, torch's default of two threads
# per process was measured 2.5x slower (main.py: 37 s against 15 s).
FAST = {"OMP_NUM_THREADS": "1"}


def run(script, *args, cwd, timeout=300, env=None):
    return run_script(script, *args, cwd=cwd, timeout=timeout, env={**FAST, **(env or {})})
