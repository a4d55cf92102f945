"""Every facemeta name a script in tools/ or benchmarks/ imports still exists, the imports inside its functions
included. The suite does not run those scripts, so a name moved between modules (as PRE_CROPPED_SETS once moved
from facemeta.align.pipeline to facemeta.data.sets) would otherwise surface only when someone runs one."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(str(p.relative_to(ROOT)) for folder in ("tools", "benchmarks") for p in (ROOT / folder).glob("*.py"))


def _missing(path: Path) -> list[str]:
    missing = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "facemeta":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ModuleNotFoundError:
                        missing.append(f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "facemeta":
                    importlib.import_module(alias.name)
    return missing


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_imports_exist(script):
    missing = _missing(ROOT / script)
    assert not missing, f"{script} imports names facemeta no longer has: {missing}"
