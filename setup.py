"""Build hook (the rest of the metadata is in pyproject.toml): the wheel and an install from the sdist carry the
shipped model. The model stays in the repository's weights/ (where tools/ship_model.py writes it and the README
points); building copies it into the package as facemeta/weights/, where facemeta looks first
(facemeta.paths.packaged_weights_dir), so `pip install facemeta-*.whl` can verify faces without the repository."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
# What the package carries from weights/: the model, its settings, its card, and SFace's NOTICE and licence (SFace
# is a member of the shipped model). MANIFEST.in puts the same files in the sdist.
SHIPPED = ("default.safetensors", "default.json", "MODEL_CARD.md", "model-card.json", "NOTICE",
           "LICENSE-Apache-2.0.txt")


class BuildPyWithWeights(build_py):
    """build_py that also copies weights/<SHIPPED> into <build_lib>/facemeta/weights/."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads weights/ from the checkout
            return
        src = HERE / "weights"
        missing = [name for name in SHIPPED if not (src / name).is_file()]
        if missing:
            raise SystemExit(f"cannot build facemeta: {', '.join(missing)} missing from {src}")
        dst = Path(self.build_lib) / "facemeta" / "weights"
        self.mkpath(str(dst))
        for name in SHIPPED:
            self.copy_file(str(src / name), str(dst / name))


setup(cmdclass={"build_py": BuildPyWithWeights})
