"""The package's structure: no import cycles between its modules, and the layers only look down."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "coordconv_fused")
KERNELS = os.path.join(ROOT, "kernels")
SHIMS = {
    "coordconv_fused.reference",
    "coordconv_fused.decomposed",
    "coordconv_fused.extension",
    "coordconv_fused.triton_backend",
    "coordconv_fused.coord_term",
}  # deprecated re-exports


EXTENSIONS = {"coordconv_fused._C", "coordconv_fused._C_testing"}  # compiled: import nothing of the package


def _modules() -> dict[str, str]:
    found = {}
    for base, prefix in ((PACKAGE, "coordconv_fused"), (KERNELS, "coordconv_fused.kernels")):
        for dirpath, _, files in os.walk(base):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), base)[:-3].replace(os.sep, ".")
                    name = prefix if rel == "__init__" else f"{prefix}.{rel.removesuffix('.__init__')}"
                    found[name] = os.path.join(dirpath, f)
    return found


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """Package modules that ``name`` imports, at module level or in functions alike."""
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            # `from pkg import sub` depends on the submodule; `from mod import name` on mod
            targets = [
                f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules or f"{mod}.{a.name}" in EXTENSIONS else mod
                for a in node.names
            ]
        else:
            continue
        for t in targets:
            if t in EXTENSIONS:
                continue
            while t and t not in modules:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                out.add(t)
    return out


def _graph():
    modules = _modules()
    # A submodule's import runs its package's __init__ first: that edge is not a dependency of the
    # importer on the __init__'s own imports, so packages are nodes of their own here.
    return {name: _imports(name, path, modules) for name, path in modules.items() if name not in SHIMS}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in SHIMS or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


# The layers, lowest first: a module may import its own layer and those below it.
LAYERS = [
    {"coordconv_fused.geometry", "coordconv_fused.malloc_tunables"},
    {"coordconv_fused.coords"},
    {"coordconv_fused.spec"},
    {
        "coordconv_fused.kernels",
        "coordconv_fused.kernels.coord_tile",
        "coordconv_fused.kernels.coord_conv_fwd",
        "coordconv_fused.kernels.coord_weight_grad",
        "coordconv_fused.kernels.launch",
        "coordconv_fused.kernels.aot",
    },
    {
        "coordconv_fused.ops",
        "coordconv_fused.ops.schema",
        "coordconv_fused.ops.arguments",
        "coordconv_fused.ops.aten",
        "coordconv_fused.ops.autograd",
        "coordconv_fused.ops.call",
        "coordconv_fused.ops.flops",
    },
    {
        "coordconv_fused.backends",
        "coordconv_fused.backends.base",
        "coordconv_fused.backends.reference",
        "coordconv_fused.backends.aten",
        "coordconv_fused.backends.native",
        "coordconv_fused.backends.choice_file",
        "coordconv_fused.backends.measured",
        "coordconv_fused.backends.triton",
    },
    {"coordconv_fused.functional"},
    {"coordconv_fused.modules"},
    {"coordconv_fused.convert", "coordconv_fused.testing"},
    {"coordconv_fused"},
    {
        "coordconv_fused.benchmark",
        "coordconv_fused.call_cost",
        "coordconv_fused.gpu_benchmark",
        "coordconv_fused.paper",
        "coordconv_fused.paper.data",
        "coordconv_fused.paper.models",
        "coordconv_fused.paper.train",
        "coordconv_fused.paper.scattered_mnist",
        "coordconv_fused.paper.detection",
        "coordconv_fused.paper.shapes",
        "coordconv_fused.paper.generative",
    },
    {"coordconv_fused.cli"},
]


def test_layers_only_look_down():
    graph = _graph()
    level = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    unplaced = sorted(m for m in graph if m not in level and m not in EXTENSIONS)
    assert not unplaced, f"modules missing from LAYERS: {unplaced}"
    upward = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        for t in targets
        if t in level
        and level[t] > level[m]
        and not (m == "coordconv_fused.backends.triton" and t.startswith("coordconv_fused.kernels"))
    ]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))
