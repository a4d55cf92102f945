"""The README's Python API example runs as written (the shared data's path swapped for wherever it is here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_python_api_example_runs(data_dir):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'Path("../shared/data/lfw/images")' in code
    code = code.replace('Path("../shared/data/lfw/images")', f"Path({str(data_dir / 'lfw' / 'images')!r})")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("Tony Blair 0.") and lines[1] == "['Colin Powell', 'Tony Blair']", lines
    decision, score = lines[2].split()[:2]
    assert decision in ("same", "different") and 0 < float(score) <= 1
