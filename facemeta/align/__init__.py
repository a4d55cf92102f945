"""facemeta.align: MTCNN detection (5 landmarks), similarity warp onto the 112x112 template, folder jobs.

Heavy modules (torch, facenet-pytorch) load only when a FaceDetector is built.
"""

from facemeta.align.cache import aligned_set
from facemeta.align.detect import POLICIES, Face, FaceDetector, select_faces
from facemeta.align.pipeline import (
    ROUTES,
    AlignResult,
    align_batch,
    align_image,
    align_rows,
    fit_error,
    summarise,
)
from facemeta.align.warp import (
    PRECROPPED_LAYOUT,
    TEMPLATE_112,
    alignment_matrix,
    estimate_similarity,
    template,
    template_crop,
    transform_points,
    warp_face,
)

__all__ = [
    "POLICIES", "ROUTES", "PRECROPPED_LAYOUT", "TEMPLATE_112",
    "AlignResult", "Face", "FaceDetector",
    "align_batch", "align_image", "align_rows", "aligned_set", "alignment_matrix", "estimate_similarity",
    "fit_error", "select_faces", "summarise", "template", "template_crop",
    "transform_points", "warp_face",
]
