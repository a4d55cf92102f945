"""`facemeta export [MODEL] --onnx OUT.onnx`: the embedding network as ONNX, with a JSON contract beside it."""

from __future__ import annotations

import argparse
import json

# facemeta.models.onnx_export's values, repeated so that `--help` does not import torch (tests/test_onnx.py checks)
DEFAULT_OPSET, MIN_OPSET, MAX_OPSET, PARITY_MIN_COSINE = 18, 17, 23, 0.9999


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `export` and its options."""
    p = subparsers.add_parser(
        "export", help="export a model's embedding network to ONNX (for ONNX Runtime)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export the embedding network of a facemeta checkpoint to ONNX.\n\n"
                    "The graph takes a float32 batch [N,3,S,S] of aligned faces, RGB, already normalised\n"
                    "((pixels / 255 - mean) / std) and returns unit embeddings [N,E]; the batch axis is dynamic.\n"
                    "Detection and alignment are not in it, nor flip test-time augmentation: the calibrated\n"
                    "threshold assumes it, so run the mirrored batch too and L2-normalise the sum.\n"
                    "OUT.json, written beside OUT.onnx, is the contract that says all of this: input name and\n"
                    "shape, image size, mean/std, the aligned chip (align_size, align_chip), embedding size,\n"
                    "threshold and threshold_far, the checkpoint's fingerprint, opset and facemeta version.\n\n"
                    "An ensemble (several members, each reading its own chip of the same landmarks) exports as one\n"
                    "graph with one input per member (input_0, input_1, ...: that member's chip, size, mean/std)\n"
                    "and one output, the ensemble's unit vector; its contract lists the members with their weights\n"
                    "and scales, and says how flip TTA combines per member.\n\n"
                    f"Before writing, ONNX Runtime is checked against torch on the faces of --check-images\n"
                    f"(aligned by facemeta), or on synthetic images: below cosine {PARITY_MIN_COSINE} the\n"
                    "export is refused and nothing is written. `facemeta verify --runtime onnx --onnx OUT.onnx`\n"
                    "uses the result.")
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="model checkpoint (.safetensors); default: the model in weights/ or $FACEMETA_MODEL")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write (OUT.json goes beside it)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset ({MIN_OPSET}..{MAX_OPSET}, default {DEFAULT_OPSET})")
    p.add_argument("--check-images", nargs="+", metavar="IMAGE",
                   help="photos for the parity check (one face each; default: synthetic images, a numerical check "
                        "of the same graph)")
    p.add_argument("--json", action="store_true", help="print the contract as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Exit 0 after writing OUT.onnx and OUT.json; 1 (one-line error, nothing written) on bad input or a failed check."""
    from facemeta.embedder import export_checkpoint_onnx
    from facemeta.models.onnx_export import check_opset, contract_path

    check_opset(args.opset)
    contract = export_checkpoint_onnx(args.model, args.onnx, opset=args.opset, images=args.check_images)
    if args.json:
        print(json.dumps({"onnx": args.onnx, "contract": str(contract_path(args.onnx)), **contract}))
    else:
        parity = contract["parity"]
        if contract.get("kind") == "ensemble":
            ins = " + ".join(f"{m['image_size']} px ({m['align_chip']} chip)" for m in contract["members"])
            what = f"ensemble of {len(contract['members'])}: {ins} in"
        else:
            what = f"{contract['image_size']} px in"
        print(f"wrote {args.onnx} and {contract_path(args.onnx)} (opset {contract['opset']}, "
              f"{what}, {contract['embedding_size']}-d out, checkpoint "
              f"{contract['checkpoint']['fingerprint']})")
        print(f"ONNX Runtime vs torch on {parity['source']}: min cosine {parity['min_cosine']:.6f}")
    return 0
