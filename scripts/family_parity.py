"""Max abs differences between vitkit and its peers for every encoder family, both ways.

Small random configs (width 64-96, depth 2), fp32 on the CPU, the cases of
tests/test_families.py: "load" converts the peer to vitkit, "save" writes a fresh vitkit model
in the peer's format and loads it there strictly; "native" is the configured size, "other" a
non-square size through the peer's own position interpolation. `--real-size` adds one public
size per family (peer-initialised random weights, native size, batch 1).

    PYTHONPATH=src python scripts/family_parity.py [--real-size]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_families as F
import vitkit


def _real_size_rows() -> list[tuple[str, str, float]]:
    import timm
    import transformers as T

    rows = []
    torch.manual_seed(0)  # the peers initialise their own random weights
    peers = {
        "DINOv2 ViT-S/14 518 (Dinov2Model)": (
            T.Dinov2Model(T.Dinov2Config(hidden_size=384, num_attention_heads=6, image_size=518)),
            518,
        ),
        "DINOv2 ViT-S/14 224, 1000 classes (Dinov2ForImageClassification)": (
            T.Dinov2ForImageClassification(
                T.Dinov2Config(
                    hidden_size=384, num_attention_heads=6, image_size=518, num_labels=1000
                )
            ),
            224,  # the hub's linear classifiers: a 518 table, run at the processor's 224 crop
        ),
        "CLIP ViT-B/32 224 (CLIPVisionModelWithProjection)": (
            T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(patch_size=32)),
            224,
        ),
        "SigLIP B/16 224 (SiglipVisionModel)": (T.SiglipVisionModel(T.SiglipVisionConfig()), 224),
    }
    for label, (peer, size) in peers.items():
        peer.eval()
        with tempfile.TemporaryDirectory() as tmp:
            peer.save_pretrained(tmp)
            ours = vitkit.from_pretrained(tmp)
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            theirs = F._hf_outputs(peer, x, ours.norm)
            mine = F._ours(ours, x, theirs)
        rows.append((label, "load", max(F._diff(mine[k], theirs[k]) for k in theirs)))
    peer = timm.create_model("deit3_small_patch16_224", pretrained=False).eval()
    sd = peer.state_dict()
    config = F.config_from_timm(sd, model_name="deit3_small_patch16_224")
    ours = F.VisionTransformer(config).eval()
    ours.load_state_dict(F.state_dict_from_timm(sd, config))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = F._timm_outputs(peer, x)
        mine = F._ours_timm(ours, x, theirs)
    rows.append(
        ("DeiT III S/16 224 (timm)", "load", max(F._diff(mine[k], theirs[k]) for k in theirs))
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real-size", action="store_true", help="add one public size per family")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"{'peer':55s} {'direction':9s} {'native':>9s} {'other':>9s}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(sorted(F.HF_CASES)):
            result = F.hf_parity(case, Path(tmp) / str(i))
            for direction, sizes in result.items():
                worst = max(worst, *sizes.values())
                print(
                    f"{'transformers ' + case:55s} {direction:9s} "
                    f"{sizes['native']:9.2e} {sizes['other']:9.2e}"
                )
    for name in sorted(F.TIMM_CASES):
        result = F.timm_parity(name)
        for direction, sizes in result.items():
            worst = max(worst, *sizes.values())
            print(
                f"{'timm ' + name:55s} {direction:9s} {sizes['native']:9.2e} {sizes['other']:9.2e}"
            )
    print(f"worst: {worst:.2e} (tolerance {F.TOL:.0e})")
    if args.real_size:
        print("\npublic sizes, native resolution, random weights:")
        for label, direction, diff in _real_size_rows():
            print(f"{label:52s} {direction:5s} {diff:9.2e}")


if __name__ == "__main__":
    main()
