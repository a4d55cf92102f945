"""Training objectives: margin softmax heads (ArcFace, CosFace), triplet loss; MFR and CDT live in mfr.py, cdt.py."""

from facemeta.objectives.margins import ArcFaceHead, CosFaceHead
from facemeta.objectives.triplet import triplet_loss

__all__ = ["ArcFaceHead", "CosFaceHead", "triplet_loss"]
