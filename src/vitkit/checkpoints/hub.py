"""Resolve a Hugging Face Hub id (`google/vit-base-patch16-224`) to local files.

huggingface_hub is optional (`pip install vitkit[hub]`) and imported only here, lazily. With
`HF_HUB_OFFLINE=1` only the local cache is used (`HF_HUB_CACHE` / `HF_HOME` or `cache_dir`);
online, files are downloaded into that cache. When the files cannot be had, the error says how
to get them onto the machine.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vitkit.checkpoints import open_clip
from vitkit.checkpoints._safety import check_relative_name
from vitkit.config import read_json
from vitkit.errors import CheckpointError, ConfigError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_hub_id(source: str) -> bool:
    """`org/name` or a bare legacy `name` that is not a path on this machine."""
    return bool(_HUB_ID.match(source)) and not source.endswith(
        (".npz", ".safetensors", ".bin", ".pth", ".pt")
    )


def check_hub_id(repo_id: object) -> str:
    """`repo_id` if it is a valid hub id (the Hub's own rules), else `CheckpointError`.

    Each part: letters, digits, `-`, `_`, `.`; no `..` or `--`; not starting or ending with
    `-` or `.`; at most 96 characters. So `org/..`, `../x` and absolute paths never reach the
    cache, whose folder names are built from the id.
    """
    bad = not isinstance(repo_id, str) or not _HUB_ID.match(repo_id)
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    for part in parts:
        bad = bad or not part or len(part) > 96 or ".." in part or "--" in part
        bad = bad or part[:1] in "-." or part[-1:] in "-."
    if bad:
        raise CheckpointError(
            f"{repo_id!r} is not a Hugging Face Hub id (expected org/name: letters, digits, "
            f"'-', '_', '.', no '..' or '--') nor an existing local path"
        )
    return repo_id  # type: ignore[return-value]


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(constants.HF_HUB_OFFLINE)


def _how_to_get(repo_id: str) -> str:
    return (
        f"on a machine with network run `huggingface-cli download {repo_id}` (or `hf "
        f"download {repo_id}`) and copy its cache folder (~/.cache/huggingface/hub, or "
        f"$HF_HUB_CACHE) here, or download the repository files (config.json and "
        f"model.safetensors) into a folder and pass that folder's path"
    )


def resolve_hub(
    repo_id: str, *, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, Path]:
    """Local paths of `config.json` and the weights of hub repository `repo_id`.

    Returns {"config.json": path, <weights file name>: path, [shards...]}; for an open_clip
    repository (no config.json) {"open_clip_config.json": path, <its weights file>: path}.
    """
    check_hub_id(repo_id)
    try:
        import huggingface_hub as hub
        from huggingface_hub.errors import RemoteEntryNotFoundError
    except ImportError as exc:
        raise CheckpointError(
            f"loading the hub id {repo_id!r} needs huggingface_hub (`pip install "
            f"'vitkit[hub]'`); or pass a local folder with config.json and model.safetensors"
        ) from exc

    offline = _offline()
    cache = str(cache_dir) if cache_dir is not None else None

    def fetch(filename: str) -> Path | None:
        """The cached/downloaded file, None if the repo has no such file; raises if unknown."""
        if offline:
            found = hub.try_to_load_from_cache(
                repo_id, filename, cache_dir=cache, revision=revision
            )
            return Path(found) if isinstance(found, str) else None
        try:
            return Path(hub.hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache))
        except RemoteEntryNotFoundError:  # the repository has no such file
            return None
        except Exception as exc:  # no network and not cached, auth, unknown repo
            raise CheckpointError(
                f"cannot get {filename} of {repo_id!r} from the Hugging Face "
                f"Hub ({type(exc).__name__}: {exc}); {_how_to_get(repo_id)}"
            ) from exc

    where = "the local cache" + (f" {cache}" if cache else " ($HF_HUB_CACHE)")
    config = fetch("config.json")
    if config is None:
        clip = fetch(open_clip.CONFIG_FILE)
        weights = next(
            ((n, p) for n in open_clip.WEIGHTS_FILES if (p := fetch(n)) is not None), None
        )
        if clip is not None and weights is not None:
            return {open_clip.CONFIG_FILE: clip, weights[0]: weights[1]}
        mode = f"HF_HUB_OFFLINE is set and {where} has" if offline else "the repository has"
        raise CheckpointError(f"{mode} no config.json for {repo_id!r}; {_how_to_get(repo_id)}")
    files = {"config.json": config}
    processor = fetch("preprocessor_config.json")
    if processor is not None:
        files["preprocessor_config.json"] = processor
    for name in WEIGHT_FILES:
        path = fetch(name)
        if path is None:
            continue
        files[name] = path
        if name.endswith(".index.json"):
            for shard in shard_names(path):
                got = fetch(shard)
                if got is None:
                    raise CheckpointError(
                        f"shard {shard} of {repo_id!r} is not in {where}; {_how_to_get(repo_id)}"
                    )
                files[shard] = got
        return files
    raise CheckpointError(
        f"no weights ({', '.join(WEIGHT_FILES)}) for {repo_id!r} in "
        f"{where if offline else 'the repository'}; {_how_to_get(repo_id)}"
    )


def shard_names(index: Path) -> list[str]:
    """The shard files a `*.safetensors.index.json` names, each a plain relative name (no `..`,
    not absolute): the caller joins them to the index's own folder."""
    try:
        data = read_json(index, "shard index")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: a shard index needs a non-empty 'weight_map' object")
    return sorted({check_relative_name(v, str(index)) for v in weight_map.values()})
