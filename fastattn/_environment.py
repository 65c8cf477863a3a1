"""The process environment of the command line (`python -m fastattn`); the library never changes it.

Imports nothing heavy: `fastattn/__init__.py` asks `cli_is_starting()` before it imports torch.
"""
from __future__ import annotations

import os
import sys

# OpenMP (libgomp) lets idle worker threads spin for a long time. When another process shares the
# cores, parallel regions then wait for descheduled spinners: on a busy 2-core machine an epoch of
# the synthetic DIF-SR run took 155-220 s instead of ~4 s. A short spin (then sleep) keeps that
# case fast and the idle case as fast as the default (Beauty SASRec epoch 13.5 s;
# OMP_WAIT_POLICY=PASSIVE would make it 47 s).
GOMP_SPINCOUNT = "20000"


def configure_cli_process() -> None:
    """Set the command line's OpenMP spin count (GOMP_SPINCOUNT) unless the user set one.

    libgomp reads the variable once, when torch loads it, so this must run before `import torch`:
    `python -m fastattn` calls it first thing (the package defers torch while the CLI starts, see
    `cli_is_starting`). Later it still reaches child processes started from this one.
    """
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)


def cli_is_starting() -> bool:
    """True while `python -m fastattn` imports the package, before fastattn/__main__.py runs.

    Python sets sys.argv[0] to "-m" while it locates a `-m` module (documented for the -m option)
    and keeps the real command line in sys.orig_argv; the module named after "-m" must be exactly
    `fastattn` (not a submodule, not another program that imports fastattn). Spellings this does
    not parse (e.g. "-mfastattn", "-Bm fastattn") read False: the package then loads eagerly, as
    for any other import, and only the spin count comes too late.
    """
    argv = getattr(sys, "argv", None)
    if not argv or argv[0] != "-m":
        return False
    orig = list(getattr(sys, "orig_argv", ()))
    return "-m" in orig[:-1] and orig[orig.index("-m") + 1] == "fastattn"
