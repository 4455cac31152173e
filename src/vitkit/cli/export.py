"""`vitkit export SOURCE --format onnx|pt2|openvino --output FILE`: a checked, deployable file."""

from __future__ import annotations

import argparse

from vitkit.cli._args import add_image_size, check_output, image_size, model_help, warn_random


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model to ONNX, torch.export (.pt2) or OpenVINO IR",
        description="Write a model to a file other runtimes load, then check the file: it runs "
        "(onnxruntime, torch.export.load or OpenVINO) against vitkit's model on a test input, "
        "the max difference is printed, and a file that does not match is not left behind. "
        "Class names travel in the file (ONNX metadata_props 'id2label').",
    )
    p.add_argument("source", metavar="SOURCE", help=model_help(presets=True, what="the export"))
    add_image_size(p)
    p.add_argument("--output", "-o", required=True, metavar="FILE",
                   help="FILE.onnx, FILE.pt2 or FILE.xml (+ FILE.bin)")  # fmt: skip
    p.add_argument("--format", "-f", choices=("onnx", "pt2", "openvino"), default=None,
                   help="default: from the suffix of --output")  # fmt: skip
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "bf16", "int8"),
        default="fp32",
        help="fp32; fp16 weights (onnx, pt2, openvino); bf16 (pt2); int8: onnxruntime dynamic "
        "quantization (onnx) or NNCF static quantization (openvino, needs --calibration)",
    )
    p.add_argument(
        "--dynamic-size",
        action="store_true",
        help="batch, height and width dynamic (multiples of the patch; the position table is "
        "resampled inside the graph); default: only the batch is",
    )
    p.add_argument(
        "--with-preprocessing",
        action="store_true",
        help="bake the checkpoint's preprocessing into the graph: the input is uint8 images of "
        "any size, (B, H, W, C) named 'images_uint8_nhwc' (or --layout nchw; C = 3, or 1 for a "
        "grayscale model), and the outputs "
        "are 'probabilities' (B, K) and 'top_indices' (B, --top-k)",
    )
    p.add_argument("--layout", choices=("nhwc", "nchw"), default="nhwc",
                   help="image layout with --with-preprocessing (nhwc)")  # fmt: skip
    p.add_argument("--top-k", type=int, default=5, help="top classes with --with-preprocessing")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (18; 18+ for preprocessing)")
    p.add_argument(
        "--calibration",
        metavar="DIR",
        default=None,
        help="a folder of real images to calibrate static int8 on (16-64 are enough)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitkit.checkpoints.resolve import resolve
    from vitkit.errors import VitkitError
    from vitkit.infer.export import export
    from vitkit.infer.predictor import load_folder

    if args.top_k < 1:
        raise VitkitError(f"--top-k must be at least 1, got {args.top_k}")
    output = check_output(args.output)
    if args.format == "openvino" or output.suffix.lower() == ".xml":
        check_output(output.with_suffix(".bin"), flag=f"--output {output}: the weights file")
    resolved = resolve(args.source, allow_preset=True, image_size=image_size(args))
    warn_random(resolved, "export", args.source)
    model, processor = resolved.model.float().eval(), resolved.processor
    calibration = load_folder(args.calibration, processor) if args.calibration else None
    result = export(
        model,
        args.output,
        format=args.format,
        precision=args.precision,
        dynamic_size=args.dynamic_size,
        processor=processor if args.with_preprocessing else None,
        channels_last=args.layout == "nhwc",
        top_k=args.top_k,
        opset=args.opset,
        calibration=calibration,
        log=None,
        stated_processor=processor,
    )
    print(result.summary())
    return 0
