"""Preprocessing throughput: vitkit's ImageProcessor vs transformers and timm, same run.

    PYTHONPATH=src python scripts/bench_processor.py

Batch of 16 skimage photos (mixed sizes) for the PIL paths; a (16, 3, 512, 512) uint8 tensor
for the tensor paths. Medians of alternating repeats after warm-up; ratio = vitkit / peer time.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import skimage.data
import torch
from PIL import Image

from vitkit.data.processor import ImageProcessor


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(repeats: int = 15) -> None:
    from timm.data import create_transform
    from transformers import ViTImageProcessor
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    names = ["astronaut", "chelsea", "coffee", "rocket"]
    photos = [Image.fromarray(getattr(skimage.data, n)()) for n in names] * 4  # 16 images
    batch = torch.from_numpy(np.stack([np.asarray(photos[0])] * 16)).permute(0, 3, 1, 2)
    batch = batch.contiguous()  # (16, 3, 512, 512) uint8

    hf, hf_pil, ours = ViTImageProcessor(), ViTImageProcessorPil(), ImageProcessor.hf_vit()
    timm_tf = create_transform(224, crop_pct=0.9, interpolation="bicubic")
    ours_timm = ImageProcessor.timm_eval()
    cases = {
        "hf_vit, 16 PIL photos": (
            lambda: ours(photos),
            {
                "transformers PIL backend": lambda: hf_pil(photos, return_tensors="pt"),
                "transformers torchvision backend": lambda: hf(photos, return_tensors="pt"),
            },
        ),
        "hf_vit, (16,3,512,512) uint8 tensor": (
            lambda: ours(batch),
            {"transformers torchvision backend": lambda: hf(list(batch), return_tensors="pt")},
        ),
        "timm_eval, 16 PIL photos": (
            lambda: ours_timm(photos),
            {"timm create_transform": lambda: torch.stack([timm_tf(p) for p in photos])},
        ),
    }
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {repeats}")
    print("| case | peer | vitkit ms | peer ms | vitkit / peer |\n|---|---|---|---|---|")
    for case, (mine, peers) in cases.items():
        for peer_name, peer in peers.items():
            mine(), peer()  # warm-up
            a, b = [], []
            for _ in range(repeats):
                a.append(_median_ms(mine, 1))
                b.append(_median_ms(peer, 1))
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"| {case} | {peer_name} | {ma:.1f} | {mb:.1f} | {ma / mb:.2f} |")


if __name__ == "__main__":
    main()
