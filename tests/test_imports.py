"""Imports point down (shared/DESIGN.md): the package is parsed, every `import` counts (also the
ones inside functions), and a forbidden edge or an import cycle fails the test."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "vitkit"

# importer package -> packages it must never import
FORBIDDEN = {
    "layers": {"models", "checkpoints", "data", "train", "infer", "serve", "cli"},
    "models": {"checkpoints", "data", "train", "infer", "serve", "cli"},
    "data": {"models", "checkpoints", "train", "infer", "serve", "cli"},
    "checkpoints": {"train", "infer", "serve", "cli"},
    "config": {"layers", "models", "checkpoints", "data", "train", "infer", "serve", "cli"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the vitkit modules it imports (the longest existing name of each import)."""
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_pkg else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import sub` imports the submodule; `from mod import name`, the module
                names = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            for full in names:
                if not full.startswith("vitkit"):
                    continue
                parts = full.split(".")
                while parts and ".".join(parts) not in modules:
                    parts.pop()
                if parts and ".".join(parts) != name:
                    targets.add(".".join(parts))
        edges[name] = targets
    return edges


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_forbidden_edges():
    edges = _edges(_modules())
    bad = []
    for src, targets in edges.items():
        for dst in targets:
            a, b = _area(src), _area(dst)
            if src in ("vitkit", "vitkit.__main__") or a == "cli":
                continue  # the public API and the command line sit on top
            if b in FORBIDDEN.get(a, set()) or b == "cli" or dst == "vitkit":
                bad.append(f"{src} -> {dst}")
    assert not bad, "imports that point up:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    edges = _edges(_modules())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_function_local_imports():
    edges = _edges(_modules())
    assert "vitkit.checkpoints.resolve" in edges["vitkit.train.trainer"]  # imported in a function
    assert "vitkit.models.vit" in edges["vitkit.presets"]


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["predict", "--help"], ["serve", "--help"], ["train", "--help"],
     ["explain", "--help"], ["models"], ["models", "--text"], ["predict"],
     ["predict", "x.jpg", "-m", "m", "--precision", "nope"]],
)  # fmt: skip
def test_the_cli_answers_help_errors_and_models_without_torch(argv):
    """`vitkit --help`, each command's help, argument errors and `vitkit models` import no
    torch, numpy or PIL (torch alone takes seconds): issue 28's CLI that answers at once."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom vitkit.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.stdout.strip().splitlines()[-1] == "[]", (done.stdout[-300:], done.stderr[-300:])


def test_import_vitkit_loads_names_on_first_use():
    import subprocess
    import sys

    code = (
        "import sys, vitkit\nassert 'torch' not in sys.modules\n"
        "from vitkit import VisionTransformer, create_model, ViTConfig\n"
        "assert 'torch' in sys.modules and vitkit.create_model is create_model\n"
        "assert set(vitkit.__all__) <= set(dir(vitkit)) and 'resolve' in vitkit.__all__\n"
        "print(type(create_model('vit_tiny_patch16_224', depth=1)).__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "VisionTransformer", done.stderr[-500:]
