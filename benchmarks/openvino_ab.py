"""OpenVINO int8 of vitkit's graph against timm's graph, same weights, alternating rounds.

    python benchmarks/openvino_ab.py [--repeats 7] [--threads 2]

Both go through NNCF static quantization (transformer preset) calibrated on the same 16 photos;
prints img/s of each and the median paired ratio vitkit / timm (RESULTS.md, issue 14).
"""

from __future__ import annotations

import argparse
import statistics

import torch

import common
import infer as B
import vitkit
from vitkit.infer import _graph, prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(common.machine_line(common.machine_info()))
    model = vitkit.create_model("vit_base_patch16_224").eval()
    timm_model = B.build_timm(model.config).eval()
    timm_model.load_state_dict(model.state_dict())
    x = B.photo_batch(16, 224, vitkit.ImageProcessor.hf_vit(224))
    ov = _graph.to_openvino(timm_model, x[:1])
    timm_int8 = _graph.compile_openvino(_graph.quantize_openvino(ov, x), "int8", args.threads)
    ours = prepare(model, "int8", backend="openvino", calibration=x)
    fns = {"timm OV int8": lambda: timm_int8(x.numpy()), "vitkit int8 openvino": lambda: ours(x)}
    times = common.round_robin(fns, repeats=args.repeats, warmup=1)
    for name, values in times.items():
        print(f"{name}: {16 / statistics.median(values):.2f} img/s")
    pairs = zip(times["timm OV int8"], times["vitkit int8 openvino"], strict=True)
    print(
        f"vitkit / timm speed (median of paired rounds): {statistics.median(a / b for a, b in pairs):.2f}"
    )


if __name__ == "__main__":
    main()
