"""Stamps of a step's stages, for scripts/bench/timeline.py.

Python imports this module when a process starts with its folder on PYTHONPATH. Where SWARM_TIMELINE_DIR is set,
the functions in STAGES are wrapped as their modules load, and each call writes "<monotonic ns> <stage>" lines to
the process's own file in that folder: the client's and every node's stamps are on one clock.
"""

from __future__ import annotations

import atexit
import functools
import importlib.abc
import importlib.machinery
import inspect
import os
import sys
import time
from collections.abc import Callable

# module -> (function's qualified name, stage at its call, stage at its return); a stage of None is not stamped
STAGES = {
    "client.session": [("InferenceSession.astep", "step", "step done")],
    "client.link": [("NodeLink._route", "reply", None)],
    "swarm.push": [("Pusher._send", "push", "pushed")],
    "node.server": [("Node._pushed_steps", "frame", None)],
    "node.scheduler": [("Scheduler.submit", "submit", None), ("Scheduler._launch", "forward", None),
                       ("Scheduler._finish", "forward done", None)],
    "node.span": [("Span.forward", None, "launched")],
    "node.link": [("ClientLink._send_outputs", "output", None)],
}

_file = None


def stamp(stage: str) -> None:
    """Write the time and the stage to this process's file (flushed when the process exits)."""
    global _file
    if _file is None:
        _file = open(os.path.join(os.environ["SWARM_TIMELINE_DIR"], f"{os.getpid()}.txt"), "a")
        atexit.register(_file.close)
    _file.write(f"{time.monotonic_ns()} {stage}\n")


def stamped(function: Callable, start: str | None, end: str | None) -> Callable:
    """function, stamping start when called and end when it returns."""
    if inspect.iscoroutinefunction(function):
        @functools.wraps(function)
        async def wrapper(*args, **kwargs):
            if start:
                stamp(start)
            result = await function(*args, **kwargs)
            if end:
                stamp(end)
            return result
    else:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if start:
                stamp(start)
            result = function(*args, **kwargs)
            if end:
                stamp(end)
            return result
    return wrapper


class StageFinder(importlib.abc.MetaPathFinder):
    """Finds STAGES' modules as the path finder does, and wraps their functions once they have run."""

    def find_spec(self, name, path, target=None):
        if name not in STAGES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            for qualname, start, end in STAGES[name]:
                owner_name, function_name = qualname.split(".")
                owner = getattr(module, owner_name)
                setattr(owner, function_name, stamped(getattr(owner, function_name), start, end))

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("SWARM_TIMELINE_DIR"):
    sys.meta_path.insert(0, StageFinder())
