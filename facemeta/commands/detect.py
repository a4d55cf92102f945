"""`facemeta detect IMAGE`: boxes, scores and five landmarks of every face in one photo."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `facemeta detect`."""
    p = subparsers.add_parser(
        "detect", help="find every face in an image (box, score, 5 landmarks)",
        description="Detect every face in IMAGE with MTCNN and print its box (x1 y1 x2 y2), detector "
                    "score and five landmarks (left eye, right eye, nose, left and right mouth corner). "
                    "If the plain image gives nothing, a padded canvas is tried (faces cropped tightly). "
                    "An unreadable image or an image without a face is an error (exit code 1).")
    p.add_argument("image", metavar="IMAGE", help="image file (JPEG, PNG, PGM, BMP, TIFF, WebP...)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--save", metavar="PATH", help="write a copy of the image with boxes and landmarks drawn")
    p.add_argument("--min-face", type=int, default=20, metavar="PX", help="smallest face to look for (default 20)")
    p.add_argument("--device", default="cpu", help="torch device for MTCNN (default cpu)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Detect, print, optionally draw; NoFaceError when there is no face."""
    from facemeta.align.detect import FaceDetector
    from facemeta.align.pipeline import box_inside, landmarks_inside, pad_image
    from facemeta.errors import NoFaceError
    from facemeta.images import load_image

    image = load_image(args.image)
    h, w = image.shape[:2]
    detector = FaceDetector(device=args.device, min_face_size=args.min_face)
    faces = detector.detect(image)
    if not faces:
        canvas, px, py = pad_image(image)
        faces = [f.shifted(-px, -py) for f in detector.detect(canvas)
                 if box_inside(f.box, canvas.shape[1], canvas.shape[0])]
        faces = [f for f in faces if landmarks_inside(f.landmarks, w, h)]
    if not faces:
        raise NoFaceError(f"{args.image}: no face found{detector.miss_note(image)}")
    if args.save:
        _save_annotated(image, faces, args.save)
    if args.json:
        print(json.dumps({"image": str(args.image), "width": w, "height": h,
                          "faces": [f.to_dict() for f in faces]}, indent=2))
    else:
        print(f"{len(faces)} face{'s' if len(faces) != 1 else ''} in {args.image} ({w}x{h})")
        for k, f in enumerate(faces, 1):
            box = " ".join(f"{v:.1f}" for v in f.box)
            pts = "  ".join(f"{x:.1f},{y:.1f}" for x, y in f.landmarks)
            print(f"  #{k} score {f.score:.4f}  box {box}  landmarks {pts}")
    return 0


def _save_annotated(image, faces, path: str) -> None:
    """Draw boxes, scores and landmarks on a BGR copy and write it (error if the format is unknown)."""
    import cv2

    from facemeta.atomic import check_output
    from facemeta.errors import FacemetaError

    out = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    thick = max(1, round(max(image.shape[:2]) / 300))
    for f in faces:
        x1, y1, x2, y2 = (round(float(v)) for v in f.box)
        cv2.rectangle(out, (x1, y1), (x2, y2), (0, 255, 0), thick)
        cv2.putText(out, f"{f.score:.2f}", (x1, max(10, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4 * thick, (0, 255, 0), thick)
        for x, y in f.landmarks:
            cv2.circle(out, (round(float(x)), round(float(y))), thick + 1, (0, 0, 255), -1)
    target = check_output(path)  # never a device, FIFO or a gallery's file
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        ok = cv2.imwrite(str(target), out)
    except cv2.error:
        ok = False
    if not ok:
        raise FacemetaError(f"cannot write {path} (use a .jpg or .png name in a writable folder)")
