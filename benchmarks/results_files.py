"""What the benchmark scripts share: a line describing this machine, and writing a result beside its table
(``OUT.json`` and ``OUT.md``). Scripts import it as ``results_files`` (``python benchmarks/<script>.py`` puts
this folder first on the path; the tests' ``load_benchmark_script`` does the same)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """Architecture, core count, CPU model and Python version, for a result's header."""
    return f"{platform.machine()}, {os.cpu_count()} CPU cores ({cpu_model()}), Python {platform.python_version()}"


def write_results(out: str | os.PathLike, result: dict, markdown: str) -> None:
    """Write ``result`` as OUT.json and its table as OUT.md (the folder is made if missing)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
