"""The import graph, read from the source: layers point one way, and the light entry points stay light.

Every import counts, also those inside functions (they are dependencies all the same). Nodes
are megagpt2's subpackages and top-level modules (megagpt2.pipeline, megagpt2.config, ...),
tools and launch.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = [  # (importer, imported): arrows that must not exist
    ("megagpt2.pipeline", "megagpt2.training"),
    ("megagpt2.eval", "megagpt2.training"),
    ("tools", "megagpt2.training"),
    ("megagpt2.*", "tools"),
]


def _module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return out


def _node(module: str) -> str:
    """megagpt2.pipeline.stage -> megagpt2.pipeline; tools.evaluate -> tools; others unchanged."""
    parts = module.split(".")
    if parts[0] == "megagpt2" and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def package_graph(root: Path = REPO) -> dict[str, set[str]]:
    files = [p for d in ("megagpt2", "tools", "launch") if (root / d).is_dir() for p in (root / d).rglob("*.py")]
    known = {_module_name(p, root) for p in files}
    graph: dict[str, set[str]] = {}
    for f in files:
        src = _node(_module_name(f, root))
        for name in _imports(f, root):
            if name in known or name.rpartition(".")[0] in known:
                dst = _node(name)
                if dst != src and dst != "megagpt2":
                    graph.setdefault(src, set()).add(dst)
    return graph


def _matches(node: str, pattern: str) -> bool:
    return node == pattern or (pattern.endswith(".*") and node.startswith(pattern[:-1]))


def forbidden_arrows(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return [
        (a, b)
        for a, targets in graph.items()
        for b in targets
        for src, dst in FORBIDDEN
        if _matches(a, src) and _matches(b, dst)
    ]


def test_no_forbidden_arrows():
    graph = package_graph()
    assert "megagpt2.checkpoint" in graph["tools"] and "megagpt2.model" in graph["megagpt2.pipeline"]  # it reads
    assert not forbidden_arrows(graph), f"forbidden imports: {forbidden_arrows(graph)}"


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` as [a, b, ..., a], or [] when there is none."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return []


def test_no_cycles_between_packages():
    cycle = find_cycle(package_graph())
    assert not cycle, f"import cycle: {' -> '.join(cycle)}"


def test_the_reader_sees_an_upward_import_inside_a_function(tmp_path):
    for rel, text in (
        ("megagpt2/__init__.py", ""),
        ("megagpt2/training/__init__.py", ""),
        ("megagpt2/training/trainer.py", "from ..pipeline import stage\n"),
        ("megagpt2/pipeline/__init__.py", ""),
        ("megagpt2/pipeline/stage.py", ""),
        ("megagpt2/pipeline/probe.py", "def f():\n    from ..training.trainer import Trainer\n"),
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = package_graph(tmp_path)
    assert forbidden_arrows(graph) == [("megagpt2.pipeline", "megagpt2.training")]
    assert find_cycle(graph) == ["megagpt2.pipeline", "megagpt2.training", "megagpt2.pipeline"]


def test_the_checks_before_launch_import_no_torch():
    """The entry, the plan and the package fronts load without torch (fast errors and --help)."""
    code = (
        "import sys; import megagpt2.training, megagpt2.training.plan, megagpt2.config, megagpt2.parallel, "
        "megagpt2.pipeline, megagpt2.data, megagpt2.distributed, megagpt2.tokenizer; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'deepspeed'))))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
