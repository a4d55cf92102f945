"""`facemeta verify A B`: are the faces in two photos the same person? `facemeta verify A --gallery G --person
NAME`: is the face in a photo that enrolled person? Prints score, threshold, decision."""

from __future__ import annotations

import argparse
import json
import sys

from facemeta.commands.options import add_runtime_options, face_policy_choices, runtime_options
from facemeta.errors import FacemetaError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `verify` and its options."""
    p = subparsers.add_parser(
        "verify", help="decide whether two photos show the same person, or a photo shows an enrolled person",
        description="Detect and align the face in each photo (its subject by default: size, nearness to the centre "
                    "and detector confidence together, with a warning when two faces compete), embed both, and "
                    "compare their cosine similarity with the model's verification threshold (calibrated on "
                    "held-out source-domain pairs at a stated false-accept rate). With --gallery and --person, "
                    "compare the face in A with that person's enrolled photos instead (the gallery's scoring: "
                    "best or mean match; the gallery's threshold unless --threshold).")
    p.add_argument("a", metavar="A", help="first image file")
    p.add_argument("b", metavar="B", nargs="?", help="second image file (not with --person)")
    p.add_argument("--gallery", metavar="GALLERY", help="with --person: the gallery the person is enrolled in")
    p.add_argument("--person", metavar="NAME", help="verify A against this enrolled person instead of B")
    p.add_argument("--domain-a", metavar="NAME", help="the domain photo A comes from (a domain of --gallery, or of --domains)")
    p.add_argument("--domain-b", metavar="NAME", help="the domain photo B comes from")
    p.add_argument("--domain", metavar="NAME", help="the domain both photos come from (--domain-a and --domain-b)")
    p.add_argument("--domains", metavar="FILE", action="append",
                   help="without a gallery: a domain statistics file from `facemeta domain export` (repeat for two)")
    p.add_argument("--model", help="model checkpoint (.safetensors); default: the model in weights/ or $FACEMETA_MODEL")
    p.add_argument("--threshold", type=float, help="decision threshold (default: the one stored with the model)")
    p.add_argument("--select", choices=face_policy_choices(exclude=("all",)), default="subject", metavar="POLICY",
                   help="which face of a photo with several to use (%(choices)s; default subject: size, nearness to the centre and "
                        "detector confidence together, as training alignment chooses; a warning when two compete)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    add_runtime_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Exit 0 after printing the result (whatever the decision); 1 on bad input (one-line error)."""
    from facemeta.checks import check_threshold
    from facemeta.embedder import FaceEmbedder

    check_threshold(args.threshold, "--threshold")
    if args.domain is not None:
        if args.domain_a is not None or args.domain_b is not None:
            raise FacemetaError("give --domain for both photos, or --domain-a/--domain-b, not both")
        args.domain_a = args.domain_b = args.domain
    named = args.domain_a is not None or args.domain_b is not None
    if (args.person is None) == (args.b is None) or (args.person is not None and args.gallery is None):
        raise FacemetaError("give two images A B, or one image A with --gallery GALLERY --person NAME")
    if args.domains and args.gallery:
        raise FacemetaError("--domains FILE is for verify without a gallery; with --gallery the domains are its own")
    if named and not (args.gallery or args.domains):
        raise FacemetaError("--domain-a/--domain-b name domains of --gallery GALLERY or of --domains FILE")
    if args.person is not None and args.domain_b is not None and args.domain is None:
        raise FacemetaError("with --person, photo A's domain is --domain-a (the person's photos keep their own)")
    if (args.b is not None and (args.gallery or args.domains)) and not named:
        raise FacemetaError("name the photos' domains with --domain-a/--domain-b (or --domain)")
    embedder = FaceEmbedder(args.model, device=args.device, select=args.select, **runtime_options(args))
    if args.gallery is not None:
        from facemeta.recognizer import FaceRecognizer

        with FaceRecognizer(args.gallery, embedder=embedder) as fr:
            if args.person is not None:
                result = fr.verify_person(args.a, args.person, threshold=args.threshold, domain=args.domain_a)
            else:
                result = fr.verify(args.a, args.b, threshold=args.threshold, domain_a=args.domain_a,
                                   domain_b=args.domain_b)
    elif args.domains:
        from facemeta.recognizer_domains import load_domain_file, verify_across

        files = {d.name: d for d in (load_domain_file(f, embedder) for f in args.domains)}

        def pick(name):
            if name is not None and name not in files:
                raise FacemetaError(f"no domain {name!r} in {', '.join(args.domains)} (it holds {', '.join(files)})")
            return None if name is None else files[name]

        result = verify_across(embedder, args.a, args.b, pick(args.domain_a), pick(args.domain_b),
                               threshold=args.threshold)
    else:
        result = embedder.verify(args.a, args.b, threshold=args.threshold)
    warnings = [f["warning"] for f in result.faces if f.get("warning")]
    for warning in warnings:  # two faces competed to be the subject of a photo
        print(f"facemeta verify: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, "person": args.person, "score": round(result.score, 6),
                          "warnings": warnings,
                          "domain_a": args.domain_a, "domain_b": args.domain_b,
                          "threshold": round(result.threshold, 6), "threshold_far": result.threshold_far,
                          "decision": result.decision, "same": result.same, "model": str(embedder.model_path),
                          "fingerprint": embedder.fingerprint, "runtime": embedder.runtime, "faces": result.faces}))
    else:
        far = f" (FAR {result.threshold_far:g}{'' if named else ' on held-out source pairs'})" \
            if result.threshold_far else " (FAR not known for these domains)" if named and args.threshold is None else ""
        print(f"score: {result.score:.4f}")
        print(f"threshold: {result.threshold:.4f}{far}")
        print(f"decision: {result.decision}")
    return 0
