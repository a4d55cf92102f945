"""Errors that the command line reports as one clear line and a non-zero exit code."""


class FacemetaError(Exception):
    """Base of every user-facing error (bad input, missing file, wrong checkpoint)."""


class ImageReadError(FacemetaError):
    """An image file is missing, empty, truncated, not an image, or too large to decode safely."""


class NoFaceError(FacemetaError):
    """No face was found where one was required."""


class ManyFacesError(FacemetaError):
    """Several faces were found where exactly one was required."""


class CheckpointError(FacemetaError):
    """A model checkpoint is missing, corrupt, or of another architecture."""


class ConfigError(FacemetaError):
    """A preset or config file has an unknown key or a bad value."""


class GalleryError(FacemetaError):
    """A gallery is corrupt, locked, or holds embeddings of another model."""
