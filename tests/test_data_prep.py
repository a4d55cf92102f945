"""One data preparation and one rule for matching pairs (issue 27, item 4), on the real LFW and ORL file lists.

facemeta.align.cache.prepare_set (read a set, select rows, align into the cache) is what training, evaluation and
the benchmark call; facemeta.data.matching is the rule that maps a pair list's paths onto rows, before alignment
(which images to align) and after (which rows to score).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from facemeta.align.cache import RowSelection, select_rows
from facemeta.data.manifest import ManifestRow
from facemeta.data.matching import RowLookup, rows_in_pairs
from facemeta.data.sets import read_pairs, read_set
from facemeta.eval.pairs import match_pairs

PACKAGE = Path(__file__).resolve().parents[1] / "facemeta"


@pytest.fixture(scope="module")
def lfw(data_dir):
    return read_set("lfw", data_dir)


def test_selection_of_a_source(lfw):
    sel = RowSelection(people_folds=(1, 2), min_images=4, max_identities=12, limit_per_identity=3)
    got = select_rows(lfw, sel)
    in_folds = [r for r in lfw if r.extra["people_fold"] in {"1", "2"}]
    counts: dict[str, int] = {}
    for r in in_folds:
        counts[r.identity] = counts.get(r.identity, 0) + 1
    names = sorted(n for n, c in counts.items() if c >= 4)[:12]
    assert len(names) == 12 and sorted({r.identity for r in got}) == names
    for n in names:  # the first three of each person, in the set's order
        assert [r.path for r in got if r.identity == n] == [r.path for r in in_folds if r.identity == n][:3]
    assert select_rows(lfw) == lfw


def test_limit_keeps_the_first_images_in_order(data_dir):
    orl = read_set("orl", data_dir)
    two = select_rows(orl, RowSelection(limit_per_identity=2))
    assert len(two) == 80 and [r.path for r in two[:2]] == [r.path for r in orl[:2]]


def test_pairs_select_the_images_they_name(lfw, data_dir):
    pairs = [p for p in read_pairs("lfw", data_dir) if p.fold == 7][:40]
    got = rows_in_pairs(lfw, pairs)
    named = {p.a for p in pairs} | {p.b for p in pairs}
    assert {r.path for r in got} == named and len(got) == len(named)
    assert select_rows(lfw, RowSelection(pairs=pairs)) == got


def test_one_rule_before_and_after_alignment(lfw, data_dir, tmp_path):
    """Aligned copies (another folder, PNG, the raw path in ``source``) match the pairs the raw rows did, and
    by stem alone when the source is not recorded."""
    pairs = [p for p in read_pairs("lfw", data_dir) if p.fold == 9][:30]
    raw = rows_in_pairs(lfw, pairs)
    aligned = [ManifestRow(str(tmp_path / r.identity / (Path(r.path).stem + ".png")), r.identity, r.domain,
                           {"source": r.path}) for r in raw]
    bare = [ManifestRow(a.path, a.identity, a.domain, {}) for a in aligned]
    for rows in (aligned, bare):
        m = match_pairs(rows, pairs)
        assert not m.missing and len(m.ia) == len(pairs)
        assert [Path(rows[i].path).stem for i in m.ia] == [Path(p.a).stem for p in pairs]
        assert rows_in_pairs(rows, pairs) == rows
    lookup = RowLookup(aligned + [ManifestRow("/elsewhere/" + Path(aligned[0].path).name, "x", "d", {})])
    assert lookup.find(Path(aligned[0].path).stem + ".jpg") is None  # a stem two rows share names neither
    assert lookup.find(raw[0].path) == 0  # the source path still does


def _calls(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return names


@pytest.mark.parametrize("module", ["train/data.py", "train/teacher.py", "eval/sets.py", "experiments/lodo.py"])
def test_preparation_is_written_once(module):
    """The callers prepare shared sets through facemeta.align.cache, not with their own read-select-align."""
    calls = _calls(PACKAGE / module)
    assert calls & {"prepare_set", "align_set_rows"}, module
    assert not calls & {"first_per_identity", "read_set"}, module
