"""The README's run command: scripts/local_swarm.py on the embedded default model."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import group_ended

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "local_swarm.py"


def test_local_swarm_generates_text_and_stops_everything():
    result = subprocess.run([sys.executable, str(SCRIPT), "--max-new-tokens", "8"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 nodes up, serving blocks 0:2, 2:4" in result.stdout
    assert "generated: '" in result.stdout
    assert "8 tokens in" in result.stdout and "tokens/s" in result.stdout
    # every node it started has ended (their command lines name the model in its local-swarm-* folder)
    leftovers = subprocess.run(["pgrep", "-f", "local-swarm-"], capture_output=True, text=True).stdout.split()
    assert leftovers == []


def test_the_swarm_of_a_killed_launcher_ends(tiny_model, tmp_path):
    """A LocalSwarm whose process is killed outright, as a timeout or the OOM killer does, takes its bootstrap
    peer and nodes with it. They ran on before, and a GPU node kept most of the GPU's memory."""
    launcher_code = (f"import sys, time; sys.path.insert(0, {str(SCRIPT.parent)!r}); "
                     "from local_swarm import LocalSwarm; "
                     f"swarm = LocalSwarm({str(tmp_path)!r}); swarm.start_bootstrap(); "
                     f"swarm.start_nodes({str(tiny_model('llama'))!r}, [(0, 4)]); "
                     "print(*(p.pid for p in swarm.processes), flush=True); time.sleep(600)")
    launcher = subprocess.Popen([sys.executable, "-c", launcher_code], stdout=subprocess.PIPE, text=True)
    children = []
    try:
        children = [int(pid) for pid in launcher.stdout.readline().split()]
        assert len(children) == 2, "the launcher did not start its swarm"
        launcher.kill()
        launcher.wait()
        # each child leads its own process group: the group holds its DHT process and libp2p daemon too
        assert [pid for pid in children if not group_ended(pid, timeout=30)] == []
    finally:
        launcher.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
