"""The `swarm` command."""

from __future__ import annotations

import argparse
import importlib
import os
import select
import signal
import sys
import threading

# A launcher that runs commands as its children (scripts/local_swarm.py) sets this to its pid: the command then ends
# when the launcher dies, even killed outright (by a timeout or the OOM killer) without stopping its children.
# Left running, a GPU node kept most of the GPU's memory.
EXIT_WITH_PARENT = "SWARM_EXIT_WITH_PARENT"

# name: (help, module, its function that adds the command's arguments, its function that runs it)
COMMANDS = {
    "node": ("serve a span of a model's blocks", "node.cli", "add_arguments", "run"),
    "bootstrap": ("start a DHT-only peer that others join through", "swarm.bootstrap", "add_arguments", "run"),
    "status": ("show the models served, their nodes, block coverage and sessions", "client.status", "add_arguments",
               "run"),
    "generate": ("continue a prompt through the swarm, streaming the text", "client.cli", "add_generate_arguments",
                 "generate"),
    "chat": ("chat with a model in the swarm from the terminal", "client.cli", "add_chat_arguments", "chat"),
    "api": ("serve an OpenAI-compatible HTTP API backed by the swarm", "client.api", "add_arguments", "run"),
}


def _exit_on_sigterm(signum: int, frame) -> None:
    # Unwind as Ctrl-C does, so the command stops the DHT process and libp2p daemon it started: killed outright,
    # it left both running. Commands that serve (node, bootstrap, api) replace this with their own handlers.
    raise SystemExit(128 + signum)


def _exit_with_launcher() -> None:
    """SIGTERM this process when the launcher named by EXIT_WITH_PARENT exits (Linux; elsewhere a no-op)."""
    launcher = os.environ.pop(EXIT_WITH_PARENT, None)  # not inherited by the DHT process or libp2p daemon
    if launcher is None or not hasattr(os, "pidfd_open"):
        return
    try:
        exited = os.pidfd_open(int(launcher))  # readable once the whole process has exited
    except ProcessLookupError:
        sys.exit("the process that launched this command has exited")

    def watch() -> None:
        select.select([exited], [], [])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="swarm", description="Serve and use language models from a swarm of nodes.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help, module_name, add_arguments, run) in COMMANDS.items():
        command = commands.add_parser(name, help=help)
        if argv and argv[0] == name:  # only the command that runs is imported: each pulls in seconds of imports
            module = importlib.import_module(module_name)
            getattr(module, add_arguments)(command)
            command.set_defaults(run=getattr(module, run))
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _exit_with_launcher()
    try:
        args.run(args)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
