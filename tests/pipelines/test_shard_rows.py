"""The shard readers of the training stages start without torch: their module imports none of it."""

from __future__ import annotations

import subprocess
import sys

from tests.paths import REPO


def test_the_shard_reader_module_imports_without_torch() -> None:
    probe = "import sys, pipelines.shard_rows; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
