"""Write src/vitkit/data/imagenet_classes.txt: the 1000 ImageNet-1k class names, one per line.

Built from the synset list and WordNet lemmas that timm ships in `timm/data/_info/`, in the
standard class-index order (index i = line i). Run once; the output is committed.

    python scripts/make_imagenet_labels.py
"""

from __future__ import annotations

from pathlib import Path

import timm.data

OUT = Path(__file__).resolve().parents[1] / "src" / "vitkit" / "data" / "imagenet_classes.txt"


def main() -> None:
    info = Path(timm.data.__file__).parent / "_info"
    synsets = (info / "imagenet_synsets.txt").read_text().split()
    lemmas = dict(
        line.split("\t", 1)
        for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines()
    )
    if len(synsets) != 1000:
        raise SystemExit(f"expected 1000 synsets, found {len(synsets)}")
    names = [lemmas[s].strip() for s in synsets]
    OUT.write_text("\n".join(names) + "\n")
    print(f"wrote {len(names)} labels to {OUT}")


if __name__ == "__main__":
    main()
