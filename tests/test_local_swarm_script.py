"""The README's run command: scripts/local_swarm.py on the embedded default model."""

import subprocess
import sys
from pathlib import Path

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
