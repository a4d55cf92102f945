"""Registries where things are defined (issue 27, item 3): every choice list of the command line equals the
registry of the things it chooses, config validation reads the same registries, and an unknown name is one
line that lists the choices.

The parser is walked as facemeta.cli.build_parser() builds it, so a choice list typed into a command (a copy
that drifts from its registry) fails here, and so does a new option with choices this test does not know.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from facemeta.cli import build_parser
from facemeta.errors import ConfigError, FacemetaError, GalleryError
from facemeta.registry import Registry, RegistryError


def _names(module: str, attr: str, exclude: tuple[str, ...] = ()) -> list[str]:
    mod = importlib.import_module(module)
    registry = next(getattr(mod, a) for a in attr.split("|") if hasattr(mod, a))
    names = registry.names() if isinstance(registry, Registry) else tuple(registry)
    return [n for n in names if n not in exclude]


# (command path, option) -> (module, registry attribute, names the option leaves out)
POLICIES = ("facemeta.align.detect", "FACE_POLICIES|POLICIES", ("all",))  # verify/enroll embed one face a photo
REGISTRY_OF = {
    ("align", "--select"): ("facemeta.align.pipeline", "SELECT", ()),
    ("verify", "--select"): POLICIES,
    ("enroll", "--select"): POLICIES,
    ("enroll", "--index"): ("facemeta.gallery.faiss_index", "KINDS", ()),
    ("enroll", "--backend"): ("facemeta.gallery.backends", "BACKENDS", ()),
    ("serve", "--backend"): ("facemeta.gallery.backends", "BACKENDS", ()),
    ("gallery import", "--backend"): ("facemeta.gallery.backends", "BACKENDS", ()),
    ("domain add", "--backend"): ("facemeta.gallery.backends", "BACKENDS", ()),
    ("domain add", "--index"): ("facemeta.gallery.faiss_index", "KINDS", ()),
    ("domain add", "--kind"): ("facemeta.gallery.domain_stats", "KINDS", ()),
    ("domain add", "--select"): POLICIES,
    ("domain calibrate", "--select"): POLICIES,
    ("train", "--method"): ("facemeta.train.methods", "METHODS", ()),
    ("train", "--leave-out"): ("facemeta.train.config", "LODO_TARGETS", ()),
    **{(cmd, "--runtime"): ("facemeta.embedder", "RUNTIMES", ())
       for cmd in ("verify", "enroll", "identify", "serve", "domain add", "domain calibrate", "export")},
}
# Modes of one command, written once, in that command (no other module lists them): not registries.
NOT_REGISTRIES = {
    ("align", "--layout"): ["auto", "identity", "domain"],
    ("eval", "--protocol"): ["auto", "pairs", "all"],
    ("serve", "--log-level"): ["critical", "error", "warning", "info", "debug"],
}


def _choice_actions() -> dict[tuple[str, str], list[str]]:
    """(command path, option) -> its choices, for every option of every (sub)command that has choices."""
    found: dict[tuple[str, str], list[str]] = {}

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif action.choices is not None:
                option = action.option_strings[-1] if action.option_strings else action.dest
                found[(" ".join(path), option)] = list(action.choices)

    walk(build_parser(), [])
    return found


CHOICES = _choice_actions()


def test_every_choice_list_is_known_here():
    unknown = set(CHOICES) - set(REGISTRY_OF) - set(NOT_REGISTRIES)
    assert not unknown, f"options with choices that name no registry: {sorted(unknown)}"


@pytest.mark.parametrize("key", sorted(k for k in REGISTRY_OF if k in CHOICES), ids=" ".join)
def test_choice_list_equals_its_registry(key):
    assert CHOICES[key] == _names(*REGISTRY_OF[key])


def test_the_registries_are_on_the_command_line():
    """The mapping above is not stale: the commands of this checkout have these options (some commands come
    with other work, so a command that is absent is skipped, but most must be there)."""
    present = [k for k in REGISTRY_OF if k in CHOICES]
    assert {("train", "--method"), ("enroll", "--index"), ("enroll", "--backend"), ("verify", "--select"),
            ("gallery import", "--backend")} <= set(present)


@pytest.mark.parametrize("key", sorted(k for k in NOT_REGISTRIES if k in CHOICES), ids=" ".join)
def test_modes_are_as_written(key):
    assert CHOICES[key] == NOT_REGISTRIES[key]


def test_building_the_parser_imports_nothing_heavy():
    """The choices are read from the registries only when a value is checked or help is shown."""
    code = ("import sys, facemeta.cli as c; c.build_parser(); "
            "print(','.join(m for m in ('torch', 'faiss', 'cv2', 'facemeta.train', 'facemeta.gallery') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_config_validation_reads_the_registries():
    from facemeta.data.sets import SET_NAMES, SETS
    from facemeta.objectives.margins import MARGIN_HEADS
    from facemeta.train.config import config_from_dict
    from facemeta.train.methods import METHODS

    methods = ", ".join(METHODS)
    assert list(METHODS)[:5] == ["erm", "mfr", "cdt", "maml-fo", "reptile"]
    assert set(MARGIN_HEADS) == {"arcface", "cosface"} and SET_NAMES == SETS.names()
    with pytest.raises(ConfigError, match=f"method: must be one of {methods}, got 'nope'"):
        config_from_dict({"method": "nope"})
    with pytest.raises(ConfigError, match="loss.head: must be one of arcface, cosface"):
        config_from_dict({"loss": {"head": "nope"}})
    with pytest.raises(ConfigError, match="must be one of lfw, "):
        config_from_dict({"data": {"sources": [{"set": "nope"}]}})


def test_a_new_method_is_registered_in_one_place(monkeypatch):
    """A method written once (its gradient function, decorated) is accepted by the config, the CLI choices and
    the benchmark presets' default grid."""
    from facemeta.commands.options import METHOD_CHOICES
    from facemeta.experiments.presets import BenchPreset
    from facemeta.train.config import config_from_dict
    from facemeta.train.methods import METHODS, erm_grad, register_method

    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))  # the registration is undone after the test

    @register_method("erm-twice", episodic=False)
    def erm_twice(joint, batch, settings):  # never stepped here
        return erm_grad(joint, batch, settings)

    assert "erm-twice" in METHOD_CHOICES
    assert config_from_dict({"method": "erm-twice"}).method == "erm-twice"
    assert BenchPreset().methods[-1] == "erm-twice"


def test_unknown_names_are_one_line_errors():
    from facemeta.gallery.backends import backend_meta
    from facemeta.gallery.faiss_index import IndexSpec
    from facemeta.train.methods import METHODS

    for call, error, choices in ((lambda: METHODS.get("nope"), ConfigError, ", ".join(METHODS)),
                                 (lambda: backend_meta("nope", None), GalleryError, "faiss, milvus"),
                                 (lambda: IndexSpec(kind="nope"), GalleryError, "flat, hnsw, ivf, ivf_sq8")):
        with pytest.raises(error) as info:
            call()
        assert isinstance(info.value, FacemetaError)
        assert str(info.value).endswith(f"(choose one of: {choices})") and "\n" not in str(info.value)


def test_registry_basics():
    reg: Registry[int] = Registry("thing")
    assert reg.register("a", 1) == 1

    @reg.register("b")
    def b():
        return 2

    assert reg.names() == ("a", "b") and "a" in reg and "z" not in reg and 3 not in reg and len(reg) == 2
    assert reg["b"] is b and list(reg) == ["a", "b"]
    reg.register("a", 1)  # the same object again: harmless (a module imported twice)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a", 5)
    with pytest.raises(RegistryError, match=r"^unknown thing 'z' \(choose one of: a, b\)$"):
        reg.get("z")


def test_cli_rejects_an_unknown_choice_in_one_line(capsys):
    from facemeta.cli import main

    with pytest.raises(SystemExit):
        main(["train", "smoke", "--method", "nope"])
    from facemeta.train.methods import METHODS

    err = capsys.readouterr().err
    assert f"invalid choice: 'nope' (choose from {', '.join(map(repr, METHODS))})" in err
