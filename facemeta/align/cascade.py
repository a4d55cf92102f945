"""MTCNN's three-stage cascade (P-, R-, O-Net, the networks and weights of facenet-pytorch) with OpenCV resampling.

facenet-pytorch resamples every pyramid level from the full image and every candidate box with
``torch.nn.functional.interpolate(mode="area")`` (an adaptive average pool), one call per box; on a 2-core CPU
that took about half of the detector's time. Here the same stages run on the same networks with the same
thresholds, box regression and non-maximum suppression (facenet-pytorch's own helpers), and only the
resampling differs: ``cv2.resize`` with INTER_AREA on float32 pixels (exact area weights, where the pool uses
whole-pixel windows), per pyramid level and per box. Boxes and points therefore differ from facenet-pytorch's
by MTCNN's own jitter (a pixel or two), which is why facemeta.align.pipeline's PIPELINE_VERSION moved to 5.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from facenet_pytorch.models.utils.detect_face import batched_nms_numpy, bbreg, generateBoundingBox, pad, rerec
from torchvision.ops.boxes import batched_nms

FACTOR = 0.709  # MTCNN's pyramid step (facenet-pytorch's default)


def _normalise(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """[N, H, W, 3] float32 pixels -> MTCNN's input [N, 3, H, W] in about [-1, 1], on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
    return (x.permute(0, 3, 1, 2) - 127.5) * 0.0078125


def _crops(images: np.ndarray, boxes: torch.Tensor, image_inds: torch.Tensor, size: int,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each box's pixels (clipped to the image, 1-based as MTCNN's pad() gives them) resized to size x size ->
    ([K, 3, size, size] network input, indices of the boxes kept: those with a non-empty crop)."""
    h, w = images.shape[1:3]
    y, ey, x, ex = pad(boxes, w, h)
    inds = image_inds.cpu().numpy()
    out, kept = [], []
    for k in range(len(y)):
        if ey[k] > y[k] - 1 and ex[k] > x[k] - 1:
            crop = images[inds[k], y[k] - 1:ey[k], x[k] - 1:ex[k]]
            out.append(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA))
            kept.append(k)
    kept_t = torch.as_tensor(kept, dtype=torch.long, device=device)
    if not out:
        return torch.zeros(0, 3, size, size, device=device), kept_t
    return _normalise(np.stack(out), device), kept_t


def _proposals(images: np.ndarray, pnet, min_size: float, threshold: float,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: P-Net over the image pyramid -> candidate boxes [M, 9] (x1, y1, x2, y2, score, regression) and
    their image indices, after NMS per scale and per image."""
    h, w = images.shape[1:3]
    scale = 12.0 / min_size
    side = min(h, w) * scale
    boxes, inds = [], []
    while side >= 12:
        size = (int(w * scale + 1), int(h * scale + 1))
        level = np.stack([cv2.resize(img, size, interpolation=cv2.INTER_AREA) for img in images])
        reg, probs = pnet(_normalise(level, device))
        found, found_inds = generateBoundingBox(reg, probs[:, 1], scale, threshold)
        pick = batched_nms(found[:, :4], found[:, 4], found_inds, 0.5)
        boxes.append(found[pick])
        inds.append(found_inds[pick])
        scale *= FACTOR
        side *= FACTOR
    if not boxes:
        return torch.zeros(0, 9, device=device), torch.zeros(0, dtype=torch.long, device=device)
    all_boxes, all_inds = torch.cat(boxes), torch.cat(inds)
    pick = batched_nms(all_boxes[:, :4], all_boxes[:, 4], all_inds, 0.7)
    all_boxes, all_inds = all_boxes[pick], all_inds[pick]
    bw, bh = all_boxes[:, 2] - all_boxes[:, 0], all_boxes[:, 3] - all_boxes[:, 1]
    refined = torch.stack([all_boxes[:, 0] + all_boxes[:, 5] * bw, all_boxes[:, 1] + all_boxes[:, 6] * bh,
                           all_boxes[:, 2] + all_boxes[:, 7] * bw, all_boxes[:, 3] + all_boxes[:, 8] * bh,
                           all_boxes[:, 4]], dim=1)
    return rerec(refined), all_inds


@torch.inference_mode()
def detect_faces(images: np.ndarray, nets: Sequence, min_size: float,
                 thresholds: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Faces in a batch of equal-sized RGB images [N, H, W, 3] (uint8) through the P-, R- and O-Net `nets`.

    -> per image (boxes [F, 5]: x1, y1, x2, y2, probability; landmarks [F, 5, 2]), unsorted; empty arrays
    where nothing passed the three `thresholds`. `min_size` is the smallest face looked for, in pixels."""
    pnet, rnet, onet = nets
    device = next(pnet.parameters()).device
    pixels = np.asarray(images, dtype=np.float32)
    n = len(pixels)
    boxes, inds = _proposals(pixels, pnet, min_size, thresholds[0], device)
    points = torch.zeros(0, 5, 2, device=device)
    x, kept = _crops(pixels, boxes, inds, 24, device)
    boxes, inds = boxes[kept], inds[kept]
    if len(boxes):  # stage 2: R-Net on 24x24 crops
        reg, probs = rnet(x)
        keep = probs[:, 1] > thresholds[1]
        boxes = torch.cat([boxes[keep, :4], probs[keep, 1:2]], dim=1)
        inds, reg = inds[keep], reg[keep]
        pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
        boxes = rerec(bbreg(boxes[pick], reg[pick]))
        inds = inds[pick]
        x, kept = _crops(pixels, boxes, inds, 48, device)
        boxes, inds = boxes[kept], inds[kept]
    if len(boxes):  # stage 3: O-Net on 48x48 crops: final boxes and the five landmarks
        reg, marks, probs = onet(x)
        keep = probs[:, 1] > thresholds[2]
        boxes = torch.cat([boxes[keep, :4], probs[keep, 1:2]], dim=1)
        inds, reg, marks = inds[keep], reg[keep], marks[keep]
        bw = (boxes[:, 2] - boxes[:, 0] + 1).unsqueeze(1)
        bh = (boxes[:, 3] - boxes[:, 1] + 1).unsqueeze(1)
        points = torch.stack([bw * marks[:, :5] + boxes[:, 0:1] - 1, bh * marks[:, 5:] + boxes[:, 1:2] - 1], dim=2)
        boxes = bbreg(boxes, reg)
        pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], inds, 0.7, "Min")
        boxes, inds, points = boxes[pick], inds[pick], points[pick]
    boxes_np, points_np, inds_np = boxes.cpu().numpy(), points.cpu().numpy(), inds.cpu().numpy()
    return [(boxes_np[inds_np == i], points_np[inds_np == i]) for i in range(n)]
