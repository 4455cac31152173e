"""The hostile suite's harness (a plain module, not a conftest, so that `tests/conftest.py`
keeps its name): every fixture is built by the test itself, and every case that
could allocate runs vitkit in a child process under a memory limit and a timeout, so a regression
fails the test instead of taking the machine down.

`run_cli(args)` runs `python -m vitkit ARGS` as a user would; `run_code(src)` runs a snippet.
`assert_user_error(result, *words)` asserts exit code 1, exactly one line on stderr naming the
`words`, and no traceback.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# the checkout under test; VITKIT_HOSTILE_SRC points the suite at another one (to compare)
SRC = Path(os.environ.get("VITKIT_HOSTILE_SRC") or Path(__file__).resolve().parents[2] / "src")
GIB = 1 << 30
# `import torch` alone maps about 3.3 GB of address space here (measured with VmPeak); the
# whole predict pipeline about 3.6 GB. 5 GiB leaves room for a tiny model and one image and
# fails any attempt to allocate what a hostile file asks for.
CLI_MEMORY = int(os.environ.get("VITKIT_HOSTILE_MEMORY_GIB", "5")) * GIB
TIMEOUT = 240


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def _limit(memory: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITKIT_")}
    env.update(
        PYTHONPATH=str(SRC),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MALLOC_ARENA_MAX="2",  # per-thread malloc arenas would eat the address-space limit
        PYTHONWARNINGS="ignore",
    )
    env.update(extra or {})
    return env


def run_cli(
    args: list[str], *, cwd: Path | None = None, memory: int = CLI_MEMORY, env: dict | None = None
) -> Result:
    """`python -m vitkit ARGS` in a child process under `memory` bytes of address space."""
    return run_code(
        "import sys; from vitkit.cli import main; sys.exit(main(sys.argv[1:]))",
        args=args,
        cwd=cwd,
        memory=memory,
        env=env,
    )


def run_code(
    src: str,
    *,
    args: list[str] = (),  # type: ignore[assignment]
    cwd: Path | None = None,
    memory: int = CLI_MEMORY,
    env: dict | None = None,
    timeout: int = TIMEOUT,
) -> Result:
    try:
        p = subprocess.run(
            [sys.executable, "-c", src, *map(str, args)],
            cwd=cwd,
            env=_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=_limit(memory),
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"still running after {timeout} s (endless work?): {exc.cmd[3:]}")
    return Result(p.returncode, p.stdout, p.stderr)


def assert_user_error(r: Result, *words: str, code: int = 1) -> str:
    """Exit `code`, one line on stderr containing every word, no traceback."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "MemoryError" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr[-3000:]
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------- fixtures as files
TINY = dict(
    image_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3
)  # fmt: skip


def write_model_folder(folder: Path, config_changes: dict | None = None, weights=None) -> Path:
    """A vitkit checkpoint folder of a tiny model: config.json + model.safetensors."""
    import torch
    from safetensors.torch import save_file

    from vitkit.config import ViTConfig
    from vitkit.presets import create_model

    folder.mkdir(parents=True, exist_ok=True)
    config = ViTConfig(**TINY)
    torch.manual_seed(0)
    sd = create_model(config).state_dict() if weights is None else weights
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    data = {"model_type": "vitkit", **config.to_dict(), **(config_changes or {})}
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def write_image(path: Path, size: tuple[int, int] = (20, 20)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)
    return path
