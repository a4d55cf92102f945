"""Folder/manifest -> aligned faces: detection with ordered fallbacks, worker processes, resumable.

Detection goes through facemeta.align.route, the one route every caller shares (the product's verify,
enroll and identify too). Routes, tried for each image until one yields landmarks (recorded as ``route``; their order and the
smallest face each looks for depend on the selection policy: ``attempts``). On every route a detection
is refused when its box leaves the canvas the detector saw (box_inside) or its landmarks fall outside
the image (landmarks_inside): on a tight crop MTCNN otherwise returns a box larger than the frame with
extrapolated, too widely spread points. For sets declared pre-cropped, boxes narrower than
PRE_CROPPED_MIN_FACE of the image are refused too (a nose or an eye mistaken for a small face).
1. ``direct``: MTCNN on the image as it is.
2. ``padded``: the canvas padded with black by PAD_FRACTION of its size on every side. Tightly
   cropped faces (Extended Yale B, ORL) fill the frame, and MTCNN needs some context around a face.
3. ``equalised``: the padded image in grey with CLAHE contrast equalisation (dark, side-lit faces).
4. ``relaxed``: the equalised image with lower detector thresholds (RELAXED_THRESHOLDS), then the
   original padded by half as much with those thresholds; a face found this way is kept only if
   its landmarks fit the template well (fit error below MAX_FIT_ERROR).
5. ``template-crop`` (only for sets declared pre-cropped): no landmarks; the image is warped as
   if the points sat where they sit in the other images of the same identity (median of their
   detected landmarks as fractions of width/height), else of the whole set, else PRECROPPED_LAYOUT.
   In a folder job on a pre-cropped set, a detection whose eye distance is more than
   SCALE_TOLERANCE off its identity's median is also replaced by the template crop (faces in
   such a set all have about the same size; a wrong relaxed detection does not).

Landmarks found on a padded/equalised image are mapped back, and the *original* pixels are warped.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facemeta.align.detect import FaceDetector
from facemeta.align.route import (  # noqa: F401 - box_inside, landmarks_inside, pad_image: this module's API too
    PRE_CROPPED_MIN_FACE,
    SELECT,
    FoundFaces,
    box_inside,
    find_faces,
    fit_error,
    landmarks_inside,
    pad_image,
)
from facemeta.align.warp import template, template_crop, template_digest, warp_face
from facemeta.data.manifest import ManifestRow, format_landmarks, parse_landmarks, write_manifest
from facemeta.errors import FacemetaError, ImageReadError
from facemeta.images import load_image

ROUTES = ("direct", "padded", "equalised", "relaxed", "template-crop")
SCALE_TOLERANCE = 0.25  # pre-cropped sets: eye distance within 25% of the identity's median
JOURNAL = ".align-journal.jsonl"
# Bump when routes, filters, the selection policy or the detector change; caches then re-align (5: align.cascade;
# 6: the 'subject' policy by default, template digest recorded: a version-5 record of an image with at most one
# face after the filters is kept, since the policy cannot change it; see _check_config).
PIPELINE_VERSION = 6
CONFIG = ".align-config.json"
LOCK = ".align.lock"


@dataclass
class AlignResult:
    """Outcome for one image: the aligned face (or None), the route taken, detector score, landmarks
    (in the source image's pixels; None for a template crop), an error reason when it failed, the
    number of faces the detector saw, the mean distance (112-px scale) of the fitted landmarks
    to the template, the chosen face's detection box (source pixels; None for a template crop), and a
    warning when two faces competed to be the subject."""

    face: np.ndarray | None
    route: str
    score: float | None
    landmarks: np.ndarray | None
    error: str | None
    faces: int = 0
    fit_error: float | None = None
    box: np.ndarray | None = None
    warning: str | None = None


def align_batch(images: Sequence[np.ndarray], detector: FaceDetector, size: int = 112,
                pre_cropped: bool = False, select: str = "subject",
                layouts: Sequence[np.ndarray | None] | None = None,
                crop_fallback: bool | None = None, chip: str = "arcface") -> list[AlignResult]:
    """Align several RGB images at once through facemeta.align.route (each route one batched detector call
    over the images still without a face), warping the face the policy chose. `layouts` (per image, fractions
    of w/h) feed the template crop of pre-cropped images; None uses the default layout. `crop_fallback=False`
    leaves pre-cropped images without a face as failures (the folder job crops them later, with layouts learnt
    from the rest of the set). `chip` picks the template (facemeta.align.warp.CHIPS)."""
    if crop_fallback is None:
        crop_fallback = pre_cropped
    if select not in SELECT:
        raise ValueError(f"select must be one of {', '.join(SELECT)}, not {select!r}")
    results: list[AlignResult] = []
    for i, (image, found) in enumerate(zip(images, find_faces(images, detector, select, pre_cropped), strict=True)):
        if found is not None:
            results.append(_from_faces(image, found, size, select, chip))
        elif crop_fallback:
            layout = layouts[i] if layouts is not None else None
            results.append(AlignResult(template_crop(image, size, layout, chip), "template-crop", None, None, None))
        else:
            results.append(AlignResult(None, "none", None, None, "no face"))
    return results


def _from_faces(image: np.ndarray, found: FoundFaces, size: int, select: str, chip: str = "arcface") -> AlignResult:
    faces = found.faces
    if select == "single" and len(faces) > 1:
        return AlignResult(None, found.route, None, None, f"several faces ({len(faces)})", faces=len(faces))
    face = faces[0]
    return AlignResult(warp_face(image, face.landmarks, size, chip), found.route, face.score, face.landmarks, None,
                       faces=len(faces), fit_error=fit_error(face.landmarks), box=face.box, warning=found.warning)


def align_image(image: np.ndarray, detector: FaceDetector, size: int = 112, pre_cropped: bool = False,
                select: str = "subject", layout: np.ndarray | None = None, chip: str = "arcface") -> AlignResult:
    """Align one RGB image through the fallback routes (see the module docstring)."""
    return align_batch([image], detector, size, pre_cropped, select, [layout], chip=chip)[0]


# ----------------------------------------------------------------------------- folder jobs

_WORKER: dict = {}


def _init_worker(detector_kwargs: dict) -> None:
    """Worker process start: one torch thread (processes give the parallelism) and one detector."""
    import torch

    torch.set_num_threads(1)
    _WORKER["detector"] = FaceDetector(**detector_kwargs)


def _process_chunk(task: tuple[list[tuple[str, str]], int, str, bool, dict | None, str]) -> list[dict]:
    """Load, align (without the template crop, done later with set-wide layouts) and save a chunk."""
    items, size, select, pre_cropped, detector_kwargs, chip = task
    detector = _WORKER.get("detector")
    if detector is None:
        detector = _WORKER["detector"] = FaceDetector(**(detector_kwargs or {}))
    records: list[dict] = []
    loaded: list[tuple[int, np.ndarray]] = []
    for k, (src, _out) in enumerate(items):
        rec = {"src": src, "ok": False}
        records.append(rec)
        try:
            img = load_image(src)
        except ImageReadError as exc:
            rec.update(reason="unreadable", detail=str(exc))
            continue
        rec.update(width=int(img.shape[1]), height=int(img.shape[0]))
        loaded.append((k, img))
    results = _align_each_on_error([img for _, img in loaded], detector, size, pre_cropped, select, chip)
    for (k, _), res in zip(loaded, results, strict=True):
        rec = records[k]
        if res.route == "error":
            rec.update(reason="error", detail=res.error or "")
            continue
        if res.face is None:
            reason = "several faces" if res.error and res.error.startswith("several") else "no face"
            rec.update(reason=reason, detail=res.error or "", faces=res.faces)
            continue
        _save_png(res.face, items[k][1])
        rec.update(ok=True, route=res.route, score=round(float(res.score), 5), faces=res.faces,
                   landmarks=format_landmarks(res.landmarks), fit_error=round(float(res.fit_error), 3))
    return records


def _align_each_on_error(images: list[np.ndarray], detector: FaceDetector, size: int, pre_cropped: bool,
                         select: str, chip: str) -> list[AlignResult]:
    """align_batch over a chunk; should it fail, each image on its own, so that one image that breaks
    the detector or the warp becomes a failure record (route "error") and the folder job goes on."""
    try:
        return align_batch(images, detector, size, pre_cropped, select, crop_fallback=False, chip=chip)
    except Exception:  # noqa: BLE001 - isolated below, image by image
        pass
    out = []
    for img in images:
        try:
            out.append(align_batch([img], detector, size, pre_cropped, select, crop_fallback=False, chip=chip)[0])
        except Exception as exc:  # noqa: BLE001 - recorded in failures.csv with its message
            text = str(exc).strip().splitlines()
            detail = f"{type(exc).__name__}: {text[0] if text else ''}"[:200]
            out.append(AlignResult(None, "error", None, None, detail))
    return out


def _save_png(face: np.ndarray, out: str) -> None:
    """Write an RGB face as PNG via a temporary name, so a half-written file never counts as done."""
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp.png")
    if not cv2.imwrite(str(tmp), cv2.cvtColor(face, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {out}")
    os.replace(tmp, out_path)


def _output_paths(rows: Sequence[ManifestRow], dst: Path) -> list[Path]:
    """Aligned PNG path of each row: DST/<relpath or path below the sources' common folder>.png."""
    if not rows:
        return []
    if all(r.extra.get("relpath") for r in rows):
        rels = [Path(r.extra["relpath"]) for r in rows]
    else:
        parents = [os.path.dirname(os.path.abspath(r.path)) for r in rows]
        common = os.path.commonpath(parents) if len(set(parents)) > 1 else os.path.dirname(parents[0])
        rels = [Path(os.path.relpath(os.path.abspath(r.path), common)) for r in rows]
    outs = [dst / rel.with_suffix(".png") for rel in rels]
    if len(set(outs)) != len(outs):
        raise FacemetaError("two source images map to the same aligned file name; give each a distinct name")
    return outs


def _read_journal(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if path.is_file():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                done[rec["src"]] = rec
    return done


def _layouts(records: dict[str, dict], rows: Sequence[ManifestRow]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Median landmark layout (fractions of w/h) per identity and over all, from detected faces."""
    by_id: dict[str, list[np.ndarray]] = defaultdict(list)
    for r in rows:
        rec = records.get(r.path)
        if rec and rec.get("ok") and rec.get("landmarks") and rec.get("width"):
            pts = np.array(parse_landmarks(rec["landmarks"]), dtype=np.float32)
            by_id[r.identity].append(pts / np.array([rec["width"], rec["height"]], dtype=np.float32))
    per_id = {k: np.median(np.stack(v), axis=0) for k, v in by_id.items()}
    every = [p for v in by_id.values() for p in v]
    return per_id, (np.median(np.stack(every), axis=0) if every else None)


def _inconsistent(rec: dict, layout: np.ndarray, tolerance: float = SCALE_TOLERANCE) -> bool:
    """In a pre-cropped set every face has about the same size: flag a detection whose eye distance
    (as a fraction of the image width) is off the identity's median by more than `tolerance`."""
    pts = np.array(parse_landmarks(rec["landmarks"]), dtype=np.float32)
    iod = float(np.linalg.norm(pts[1] - pts[0])) / rec["width"]
    ref = float(np.linalg.norm(layout[1] - layout[0]))
    return ref > 0 and abs(iod / ref - 1.0) > tolerance


def align_rows(rows: Sequence[ManifestRow], dst_dir: str | os.PathLike, size: int = 112, workers: int = 2,
               pre_cropped: bool = False, progress: bool = True, select: str = "subject",
               chunk_size: int = 32, retry_failures: bool = False,
               detector_kwargs: dict | None = None,
               stats: dict | None = None, chip: str = "arcface") -> tuple[list[ManifestRow], list[dict]]:
    """Align every row's image into dst_dir (same tree, PNG); resumable; writes manifest.csv and failures.csv.

    Returns (aligned rows, failure records). Aligned rows point at the PNG and keep the source
    row's extras plus ``source``, ``score``, ``landmarks`` (source pixels), ``route``, ``faces``
    and ``fit_error``. Failures are dicts with path, identity, domain, reason (unreadable, no face,
    several faces, error: the image broke the detector or the warp) and detail. Every finished image is appended to dst_dir/.align-journal.jsonl,
    so an interrupted or repeated run skips what is done (failures too, unless retry_failures).
    `stats`, when given, is filled with the counts of :func:`summarise` (including images skipped).
    `chip` picks the template faces are warped onto (``arcface``: DESIGN.md's; ``dlib``: dlib's face chip).
    """
    if select not in SELECT:
        raise ValueError(f"select must be one of {', '.join(SELECT)}, not {select!r}")
    template(size, chip)  # validates size and chip
    dst = Path(dst_dir)
    if dst.exists() and not dst.is_dir():
        raise FacemetaError(f"{dst} exists and is not a folder: give a folder for the aligned faces")
    try:
        dst.mkdir(parents=True, exist_ok=True)
        with _folder_lock(dst):  # another process aligning into the same folder (torchrun ranks) waits here
            return _align_rows(rows, dst, size, workers, pre_cropped, progress, select, chunk_size, retry_failures,
                               detector_kwargs, stats, chip)
    except OSError as exc:
        where = exc.filename or dst
        raise FacemetaError(f"cannot write aligned faces into {dst}: {where}: {exc.strerror or exc}") from None


def _align_rows(rows, dst: Path, size, workers, pre_cropped, progress, select, chunk_size, retry_failures,
                detector_kwargs, stats, chip) -> tuple[list[ManifestRow], list[dict]]:
    """The body of align_rows (which turns OSError from writing into a one-line FacemetaError)."""
    _check_config(dst, size, chip)
    rows = list(rows)
    outs = _output_paths(rows, dst)
    journal_path = dst / JOURNAL
    records = _read_journal(journal_path)
    todo = []
    for row, out in zip(rows, outs, strict=True):
        rec = records.get(row.path)
        if rec is None or (rec.get("ok") and not out.is_file()) or (not rec.get("ok") and retry_failures):
            todo.append((row.path, str(out)))
    skipped = len(rows) - len(todo)
    with open(journal_path, "a", encoding="utf-8") as journal:
        for rec in _run_chunks(todo, size, select, pre_cropped, workers, chunk_size, progress, detector_kwargs, chip):
            records[rec["src"]] = rec
            journal.write(json.dumps(rec) + "\n")
        journal.flush()
        if pre_cropped:
            per_id, overall = _layouts(records, rows)
            for row, out in zip(rows, outs, strict=True):
                rec = records.get(row.path)
                if not rec or rec.get("route") == "template-crop":
                    continue
                layout = per_id.get(row.identity, overall)
                bad = not rec.get("ok") and rec.get("reason") == "no face"
                if rec.get("ok") and layout is not None and _inconsistent(rec, layout):
                    bad = True
                    rec = {**rec, "detail": "detected landmarks inconsistent with the set; "
                                            f"detector said {rec.get('landmarks')} at {rec.get('score')}"}
                if bad:
                    img = load_image(row.path)
                    _save_png(template_crop(img, size, layout, chip), str(out))
                    rec = {**rec, "ok": True, "route": "template-crop", "score": None, "landmarks": "",
                           "fit_error": None}
                    records[row.path] = rec
                    journal.write(json.dumps(rec) + "\n")
        journal.flush()
        os.fsync(journal.fileno())
    aligned, failures = [], []
    for row, out in zip(rows, outs, strict=True):
        rec = records[row.path]
        if rec.get("ok"):
            extra = {**row.extra, "source": row.path,
                     "score": "" if rec.get("score") is None else str(rec["score"]),
                     "landmarks": rec.get("landmarks", ""), "route": rec["route"],
                     "faces": str(rec.get("faces", 0)),
                     "fit_error": "" if rec.get("fit_error") is None else str(rec["fit_error"])}
            aligned.append(ManifestRow(str(out), row.identity, row.domain, extra))
        else:
            failures.append({"path": row.path, "identity": row.identity, "domain": row.domain,
                             "reason": rec.get("reason", "no face"), "detail": rec.get("detail", "")})
    write_manifest([ManifestRow(os.path.relpath(r.path, dst), r.identity, r.domain, r.extra) for r in aligned],
                   dst / "manifest.csv")
    _write_failures(failures, dst / "failures.csv")
    if stats is not None:
        stats.update(summarise(aligned, failures, skipped))
    return aligned, failures


@contextlib.contextmanager
def _folder_lock(dst: Path):
    """Hold an exclusive flock on dst/.align.lock (not following a link) while a job writes into dst."""
    import fcntl

    fd = os.open(dst / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _check_config(dst: Path, size: int, chip: str = "arcface") -> None:
    """Refuse a destination aligned at another size or onto another chip; start afresh when the pipeline
    version or the template changed (the previous journal is kept as .align-journal.jsonl.v<old>). From version
    5 to 6 (the subject policy) the records of images with at most one face after the filters are carried over:
    no policy can choose differently there."""
    cfg_path = dst / CONFIG
    digest = template_digest(chip)
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError:
            cfg = {}
        if int(cfg.get("size", size)) != size:
            raise FacemetaError(f"{dst} holds faces aligned at size {cfg['size']}, not {size}: "
                                "use another destination folder")
        if cfg.get("chip", "arcface") != chip:
            raise FacemetaError(f"{dst} holds faces aligned onto the {cfg.get('chip')} chip, not {chip}: "
                                "use another destination folder")
        # caches written before digests were recorded (version 5 and older) used today's templates
        same_template = cfg.get("template", digest) == digest
        if cfg.get("version") == PIPELINE_VERSION and same_template:
            return
        journal = dst / JOURNAL
        if journal.is_file():
            old = dst / f"{JOURNAL}.v{cfg.get('version', 1)}"
            os.replace(journal, old)
            if cfg.get("version") == 5 and same_template:
                _carry_single_faces(old, journal)
    record = {"size": size, "version": PIPELINE_VERSION, "template": digest,
              **({"chip": chip} if chip != "arcface" else {})}
    cfg_path.write_text(json.dumps(record) + "\n")


def _carry_single_faces(old: Path, new: Path) -> None:
    """Copy the version-5 journal records that version 6 would repeat: images aligned from one face (or by the
    template crop) and images without a face (the routes and filters are unchanged)."""
    kept = [rec for rec in _read_journal(old).values()
            if not rec.get("ok") and rec.get("reason") in ("no face", "unreadable")
            or rec.get("ok") and (rec.get("route") == "template-crop" or int(rec.get("faces", 2)) <= 1)]
    with open(new, "w", encoding="utf-8") as fh:
        for rec in kept:
            fh.write(json.dumps(rec) + "\n")


def _write_failures(failures: list[dict], path: Path) -> None:
    import csv

    from facemeta.atomic import atomic_write

    with atomic_write(path) as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "identity", "domain", "reason", "detail"])
        writer.writeheader()
        writer.writerows(failures)


def _run_chunks(todo: list[tuple[str, str]], size: int, select: str, pre_cropped: bool, workers: int,
                chunk_size: int, progress: bool, detector_kwargs: dict | None, chip: str = "arcface"):
    """Yield one record per image, from worker processes (workers > 1) or in this process."""
    if not todo:
        return
    from tqdm import tqdm

    workers = max(1, int(workers))
    per = max(4, min(chunk_size, -(-len(todo) // (workers * 4))))
    chunks = [todo[i:i + per] for i in range(0, len(todo), per)]
    tasks = [(c, size, select, pre_cropped, detector_kwargs, chip) for c in chunks]
    bar = tqdm(total=len(todo), desc="align", unit="img", disable=not progress, file=sys.stderr)
    try:
        if workers == 1:
            for task in tasks:
                recs = _process_chunk(task)
                bar.update(len(recs))
                yield from recs
        else:
            import multiprocessing as mp

            # fork where available (no torch re-import, no __main__ guard; each worker sets one torch thread first)
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(detector_kwargs or {},)) as pool:
                for recs in pool.imap_unordered(_process_chunk, tasks):
                    bar.update(len(recs))
                    yield from recs
    finally:
        bar.close()


def summarise(aligned: Sequence[ManifestRow], failures: Sequence[dict], skipped: int = 0) -> dict:
    """Counts for the end of a run: totals, routes taken and failure reasons."""
    return {"images": len(aligned) + len(failures), "aligned": len(aligned), "failed": len(failures),
            "skipped": skipped, "routes": dict(Counter(r.extra.get("route", "") for r in aligned)),
            "reasons": dict(Counter(f["reason"] for f in failures))}
