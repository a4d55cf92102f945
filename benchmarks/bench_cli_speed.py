"""Command line against command line: facemeta's `verify` and `identify` against face_recognition's own CLI, whole
processes timed from outside, on the same LFW photos in one run (issue 27, item 7).

Arms (each a fresh process; everything it does counts: interpreter start, imports, model and detector loading,
decoding, detection, alignment, embedding, search, printing):
- one photo against one: ``facemeta verify A B`` (torch runtime, and ``--runtime onnx``: no torch in the process)
  against ``face_recognition KNOWN1 B`` (KNOWN1 holds A alone: the peer's 1:1 check);
- 200 photos against 20 enrolled people: ``facemeta identify G DIR --json`` (both runtimes) against
  ``face_recognition KNOWN DIR`` (KNOWN: the same 20 enrolment photos, one per person).
DIR holds 5 other photos of each of the 20 people and one photo each of 100 people never enrolled. The gallery
is enrolled before the timed runs (not timed). The 1:1 arms run once untimed (filling the ONNX cache, and the
page cache with the libraries), the 200 photos are read once, then REPEATS rounds take every arm in turn; the table gives each arm's median wall time, CPU time
(user + system of the process and its children) and peak resident memory (``getrusage(RUSAGE_CHILDREN)`` of a
small wrapper process that starts only that command). The answers of the last round are scored too: enrolled
people named right in some face of their photo, strangers given a name.

face_recognition 1.3.0 is installed with ``pip install face_recognition --no-deps`` (dlib-bin and
face-recognition-models are facemeta's own extras); its models package imports ``pkg_resources``, which
setuptools >= 81 no longer ships, so its arm runs with a four-line stand-in (``resource_filename`` only) on
PYTHONPATH: that stand-in imports faster than the real module would, so if anything it favours the peer.

    python benchmarks/bench_cli_speed.py --out benchmarks/results/cli_speed
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_files import machine, write_results

REPEATS = 3
PEOPLE, PROBES_EACH, STRANGERS = 20, 5, 100
GOAL_VERIFY_S, GOAL_VERIFY_MB, GOAL_SPEEDUP = 1.5, 400, 4.0
SHIM = '''"""Stand-in for setuptools' pkg_resources (not in setuptools >= 81): resource_filename only."""
import importlib.util
import os


def resource_filename(package, resource):
    return os.path.join(os.path.dirname(importlib.util.find_spec(package).origin), resource)
'''
# Runs one command with its output in files, then reports its wall time, CPU time and peak memory: the wrapper's
# children are that command alone (and what it starts), so RUSAGE_CHILDREN's peak is the command's.
WRAPPER = """import json, resource, subprocess, sys, time
out, err, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(out, "w") as o, open(err, "w") as e:
    t = time.perf_counter()
    rc = subprocess.run(argv, stdout=o, stderr=e).returncode
    wall = time.perf_counter() - t
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "wall_s": wall, "cpu_s": u.ru_utime + u.ru_stime, "peak_mb": u.ru_maxrss / 1024}))
"""


def workspace(root: Path, data: Path, seed: int = 0) -> dict:
    """Links to the LFW photos of the run under `root`: ENROLL/<name>/ (facemeta), KNOWN/<name>.jpg and KNOWN1/
    (face_recognition), DIR (200 photos to identify); -> what was chosen."""
    images = data / "lfw" / "images"
    people = sorted(p for p in images.iterdir() if p.is_dir())
    rng = random.Random(seed)
    rich = [p for p in people if len(list(p.glob("*.jpg"))) > PROBES_EACH]
    enrolled = sorted(rng.sample(rich, PEOPLE))
    strangers = sorted(rng.sample([p for p in people if p not in enrolled], STRANGERS))
    for sub in ("ENROLL", "KNOWN", "KNOWN1", "DIR"):
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir(parents=True)
    probes = {}
    for person in enrolled:
        photos = sorted(person.glob("*.jpg"))
        (root / "ENROLL" / person.name).mkdir()
        (root / "ENROLL" / person.name / photos[0].name).symlink_to(photos[0])
        (root / "KNOWN" / f"{person.name}.jpg").symlink_to(photos[0])
        for photo in photos[1:1 + PROBES_EACH]:
            (root / "DIR" / photo.name).symlink_to(photo)
            probes[photo.name] = person.name
    for person in strangers:
        photo = sorted(person.glob("*.jpg"))[0]
        (root / "DIR" / photo.name).symlink_to(photo)
        probes[photo.name] = None
    first = sorted(enrolled[0].glob("*.jpg"))
    pair = (str(first[0]), str(first[1]))
    (root / "KNOWN1" / f"{enrolled[0].name}.jpg").symlink_to(first[0])
    return {"enrolled": [p.name for p in enrolled], "probes": probes, "pair": pair}


def arms(root: Path, pair: tuple[str, str]) -> dict[str, list[str]]:
    """The commands timed, by arm name."""
    fm = [sys.executable, "-m", "facemeta"]
    fr = [str(Path(sys.executable).with_name("face_recognition"))]
    gallery, folder = str(root / "G"), str(root / "DIR")
    return {
        "verify (torch)": [*fm, "verify", *pair],
        "verify (onnx)": [*fm, "verify", *pair, "--runtime", "onnx"],
        "face_recognition 1:1": [*fr, str(root / "KNOWN1"), pair[1]],
        "identify 200 (torch)": [*fm, "identify", gallery, folder, "--json"],
        "identify 200 (onnx)": [*fm, "identify", gallery, folder, "--json", "--runtime", "onnx"],
        "face_recognition 200": [*fr, str(root / "KNOWN"), folder],
    }


def run_once(argv: list[str], root: Path, env: dict) -> dict:
    """One timed process -> rc, wall_s, cpu_s, peak_mb (its output kept in root/last.out, last.err)."""
    out = subprocess.run([sys.executable, "-c", WRAPPER, str(root / "last.out"), str(root / "last.err"), *argv],
                         capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {(root / 'last.err').read_text()[-1500:]}")
    return result


def score(name: str, text: str, probes: dict[str, str | None]) -> dict:
    """Enrolled people named right in some face of their photo, strangers named, photos with no face named."""
    named: dict[str, set[str]] = {p: set() for p in probes}
    if name.startswith("identify"):
        for line in text.splitlines():
            rec = json.loads(line)
            named[Path(rec["image"]).name] |= {f["identity"] for f in rec.get("faces", [])
                                               if f["identity"] != "unknown"}
    else:
        for line in text.splitlines():
            path, _, who = line.rpartition(",")
            if who not in ("unknown_person", "no_persons_found") and Path(path).name in named:
                named[Path(path).name].add(who)
    known = [p for p, who in probes.items() if who]
    return {"enrolled_named_right": sum(probes[p] in named[p] for p in known), "enrolled": len(known),
            "strangers_named": sum(bool(named[p]) for p, who in probes.items() if not who),
            "strangers": len(probes) - len(known)}


def table(result: dict) -> str:
    """The Markdown page of a run."""
    rows = result["arms"]
    lines = [
        "# Command line against command line: facemeta and face_recognition",
        "",
        f"{result['machine']}; load average {result['load_before']} before, {result['load_after']} after "
        f"(a machine shared with other jobs: wall times wander with it, CPU times less so). "
        f"facemeta {result['facemeta_commit']}; face_recognition {result['face_recognition']}, dlib "
        f"{result['dlib']}. Whole processes, median of {result['repeats']} runs taken in turn; peak = the "
        "process's largest resident set. `python benchmarks/bench_cli_speed.py --out benchmarks/results/cli_speed`.",
        "",
        "| arm | wall (s) | CPU (s) | peak (MB) | runs, wall (s) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        runs = ", ".join(f"{x['wall_s']:.2f}" for x in r["runs"])
        lines.append(f"| {name} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_mb']:.0f} | {runs} |")
    g = result["goals"]
    lines += ["", "## The goals of issue 27", "",
              f"- one `verify` under {GOAL_VERIFY_S} s wall and {GOAL_VERIFY_MB} MB peak: torch runtime "
              f"{g['verify_torch']}, onnx runtime {g['verify_onnx']}.",
              f"- 200 photos at least {GOAL_SPEEDUP:g}x faster whole-process than face_recognition's CLI: "
              f"torch runtime {g['identify_torch']}, onnx runtime {g['identify_onnx']}.",
              "", "## The answers of the last round", "",
              "| arm | enrolled people named right | strangers given a name |", "|---|---:|---:|"]
    for name, s in result["answers"].items():
        lines.append(f"| {name} | {s['enrolled_named_right']} / {s['enrolled']} | "
                     f"{s['strangers_named']} / {s['strangers']} |")
    lines += ["", "Thresholds are each tool's own: facemeta's calibrated one (the gallery's, FAR "
              f"{result['threshold_far']}), face_recognition's tolerance 0.6 (Euclidean distance).", "",
              "Threads: face_recognition's CLI works in one process (its default `--cpus 1`); facemeta "
              "uses its runtimes' defaults (torch's threads, or ONNX Runtime's: one per core, "
              f"OMP_NUM_THREADS={result['omp_num_threads']}). The onnx arms load no torch (tests/test_fast_start.py) "
              "and run MTCNN on ONNX Runtime too (facemeta.align.mtcnn_onnx).", ""]
    return "\n".join(lines)


def _goal_verify(r: dict) -> str:
    ok = r["wall_s"] < GOAL_VERIFY_S and r["peak_mb"] < GOAL_VERIFY_MB
    return f"{'met' if ok else 'NOT met'} ({r['wall_s']:.2f} s, {r['peak_mb']:.0f} MB)"


def _goal_speedup(peer: dict, r: dict) -> str:
    ratio = peer["wall_s"] / r["wall_s"]
    cpu = peer["cpu_s"] / r["cpu_s"]
    return f"{'met' if ratio >= GOAL_SPEEDUP else 'NOT met'} ({ratio:.2f}x wall, {cpu:.2f}x CPU)"


def main() -> None:
    """Build the workspace, enrol the gallery, time every arm REPEATS times in turn, write OUT.json and OUT.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/cli_speed", help="OUT.json and OUT.md")
    parser.add_argument("--work", help="folder for links, gallery and outputs (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args()
    from facemeta.paths import data_root

    root = Path(args.work or tempfile.mkdtemp(prefix="facemeta-cli-speed-"))
    chosen = workspace(root, data_root())
    (root / "shim").mkdir(exist_ok=True)
    (root / "shim" / "pkg_resources.py").write_text(SHIM)
    env = dict(os.environ)
    fr_env = {**env, "PYTHONPATH": os.pathsep.join([str(root / "shim"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    shutil.rmtree(root / "G", ignore_errors=True)
    subprocess.run([sys.executable, "-m", "facemeta", "enroll", str(root / "G"), "--folder", str(root / "ENROLL"),
                    "--no-progress"], check=True, env=env, capture_output=True)
    commands = arms(root, chosen["pair"])
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    answers = {}
    for photo in (root / "DIR").iterdir():  # the page cache holds every photo before the first timed run
        photo.read_bytes()
    for round_ in range(args.repeats + 1):  # round 0: untimed warm-up of the 1:1 arms (fills the ONNX cache too)
        for name, argv in commands.items():
            if not round_ and "200" in name:
                continue
            result = run_once(argv, root, fr_env if name.startswith("face_recognition") else env)
            print(f"round {round_} {name}: {result['wall_s']:.2f} s, {result['peak_mb']:.0f} MB", file=sys.stderr)
            if round_:
                runs[name].append(result)
            if round_ == args.repeats and "200" in name:
                answers[name] = score(name, (root / "last.out").read_text(), chosen["probes"])
    arms_out = {name: {"command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(commands[name])),
                       "runs": r, **{k: statistics.median(x[k] for x in r) for k in ("wall_s", "cpu_s", "peak_mb")}}
                for name, r in runs.items()}
    import dlib

    from facemeta.embedder import default_model_path

    meta = json.loads(default_model_path().with_suffix(".json").read_text())["meta"]
    fr_version = subprocess.run([sys.executable, "-m", "pip", "show", "face_recognition"], capture_output=True,
                                text=True).stdout.split("Version: ")[-1].split()[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    a = arms_out
    result = {
        "machine": machine(), "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
        "facemeta_commit": commit, "face_recognition": fr_version, "dlib": dlib.__version__,
        "repeats": args.repeats, "threshold_far": meta.get("threshold_far"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "workspace": {"enrolled": chosen["enrolled"], "photos": len(chosen["probes"]), "pair": chosen["pair"]},
        "arms": arms_out, "answers": answers,
        "goals": {"verify_torch": _goal_verify(a["verify (torch)"]), "verify_onnx": _goal_verify(a["verify (onnx)"]),
                  "identify_torch": _goal_speedup(a["face_recognition 200"], a["identify 200 (torch)"]),
                  "identify_onnx": _goal_speedup(a["face_recognition 200"], a["identify 200 (onnx)"])},
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_results(args.out, result, table(result))
    print(table(result))


if __name__ == "__main__":
    main()
