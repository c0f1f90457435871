"""The architecture check: import-linter's contracts in pyproject.toml ([tool.importlinter]) hold.

They forbid import cycles (between the modules of each package and between subpackages), imports of the
command line or the daemon loop from below, leaves that import upwards, and merge/ importing watcher/.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint_imports = Path(sys.executable).parent / "lint-imports"  # installed with the `test` extra
    # The checkout's code, not an installed copy; no cache folder written into the checkout.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr  # the output names each broken contract and the imports
