"""The package's structure (DESIGN.md, "one home per concept"), checked from the source itself:
no import cycle, nothing importing upward, family facts only in edgemed/models/, format branches
only in edgemed/formats/, no file too big to read in one sitting."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "edgemed"
MAX_LINES = 500

# Layers, top (0) to bottom: a module may import its own layer and those below, never above.
# The longest matching prefix decides a module's layer.
LAYERS: dict[str, int] = {
    "edgemed": 0, "edgemed.__main__": 0, "edgemed.cli": 0,
    "edgemed.pipeline": 1, "edgemed.bench": 1, "edgemed.demo.train": 1, "edgemed.demo.evaluate": 1,
    "edgemed.plan": 2, "edgemed.plan_host": 2,
    "edgemed.transforms": 3, "edgemed.formats": 3, "edgemed.context": 3,
    "edgemed.reference": 4, "edgemed.calibration": 4, "edgemed.models": 4, "edgemed.demo": 4, "edgemed.data": 4,
    "edgemed.runtime": 5,
    # Data, registries and leaf helpers every layer reads.
    "edgemed.formats.base": 6, "edgemed.imaging": 6, "edgemed.artifact": 6, "edgemed.atomic": 6,
    "edgemed.recipe": 6, "edgemed.target": 6, "edgemed.steps": 6, "edgemed.registry": 6, "edgemed.errors": 6,
    "edgemed.host": 6, "edgemed._version": 6, "edgemed._yaml": 6, "edgemed._resources": 6,
    "edgemed.bench.suites": 6, "edgemed.bench.scoring": 6, "edgemed.bench.meters": 6, "edgemed.bench.energy": 6,
}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = p
    return mods


def _import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported edgemed module: line}, every import statement (in functions and under
    TYPE_CHECKING too), resolved to the longest module name that exists."""
    mods = _modules()
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for m, p in mods.items():
        pkg = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for t in names:
                while t and t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != m:
                    graph[m].setdefault(t, node.lineno)
                    break
    return graph


def _layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[best]


def test_no_import_cycle():
    graph = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_nothing_imports_upward():
    upward = [f"{m} imports {t} (line {line}): layer {_layer(m)} -> {_layer(t)}"
              for m, targets in _import_graph().items() for t, line in targets.items() if _layer(t) < _layer(m)]
    assert not upward, "\n".join(upward)


def _string_constants(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node


def _outside(*folders: str):
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).as_posix()
        if not any(rel.startswith(f + "/") for f in folders):
            yield rel, p


# llama.cpp's own vocabulary names, which happen to spell a model_type: its tokenizer model
# "llama" (SentencePiece-style BPE) and its pre-tokenizer "qwen2". Not family knowledge.
LLAMA_CPP_VOCAB_NAMES = {("formats/gguf/tokenizer.py", "llama"), ("formats/gguf/tokenizer.py", "qwen2")}


def test_model_type_strings_live_only_in_models():
    from edgemed.models.base import _DECODERS, FAMILIES, model_types

    names = set(model_types()) | set(_DECODERS) | set(FAMILIES) - {"decoder"}
    found = [f"{rel}:{node.lineno}: '{node.value}'" for rel, p in _outside("models")
             for node in _string_constants(p) if node.value in names and (rel, node.value) not in LLAMA_CPP_VOCAB_NAMES]
    assert not found, "family or model_type literals outside edgemed/models/:\n" + "\n".join(found)


def test_format_branches_live_only_in_formats():
    from edgemed.formats.base import FORMATS

    formats = set(FORMATS)
    found = []
    for rel, p in _outside("formats"):
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            consts = [c for side in [node.left, *node.comparators] for c in ast.walk(side)
                      if isinstance(c, ast.Constant) and c.value in formats]
            if consts:
                found.append(f"{rel}:{node.lineno}: compares with '{consts[0].value}'")
    assert not found, "format branches outside edgemed/formats/:\n" + "\n".join(found)


@pytest.mark.parametrize("kind", ["int4", "family"])
def test_adding_an_algorithm_or_a_family_is_one_module_and_its_name(kind):
    """The registries find their plugins from a list of module names: every shipped plugin module
    registers what it holds, and nothing else names it."""
    from edgemed.formats.onnx.int4 import INT4_ALGORITHMS, INT4_MODULES
    from edgemed.models.families import FAMILY_MODULES
    from edgemed.models.base import FAMILIES

    registry, modules = (INT4_ALGORITHMS, INT4_MODULES) if kind == "int4" else (FAMILIES, FAMILY_MODULES)
    owners = {obj.__module__ for _, obj in registry.items()}
    assert owners == set(modules)


def test_no_file_over_the_limit():
    big = [f"{p.relative_to(PKG)}: {n} lines" for p in sorted(PKG.rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not big, f"files over {MAX_LINES} lines:\n" + "\n".join(big)
