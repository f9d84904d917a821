"""The layers of src/daguerre have no import cycles, function-local imports included (issue 14): a local import
that exists to break a cycle is a layering bug (shared/STYLE.md). The graph is read with `ast`, not by importing.

`LAYERS` pins the layering of docs/design.md ("Layers"): a module imports its own package and packages of
lower layers only (so `models/` never imports `checkpoints/`, and `diffusion/` never imports `models/`);
only the front ends of the last layer import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "daguerre"

# The layers of daguerre, lowest first; each name is a top-level module or package of src/daguerre.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("daguerre", "untrusted", "fileio", "memory", "cpu"),  # the version; reading others' files, writing
    # atomically; giving freed heap memory back; what the CPU has
    ("config", "limits", "pngmeta", "quantize"),  # typed model configs and presets; bounds of a request; PNG
    # parameters; int8 weights of any network (and quantising while they are read)
    ("weights", "nn", "diffusion", "data"),  # reading and strictly loading weights; primitives; the math; datasets
    ("models", "compile"),  # the networks, one file each; compiling one for inference
    ("components", "guidance", "conditioning", "precision"),  # a model in memory, its one `build_components`;
    # denoiser wrappers; how a model is conditioned (its conditioner); the compute dtype chosen for the machine
    ("checkpoints",),  # the file formats: single files, diffusers folders, the VAE file
    ("lora",),  # LoRAs and embeddings merged into a loaded model (their layer names are the checkpoints' tables)
    ("registry",),  # what `--model NAME` means
    ("pipelines",),  # txt2img, img2img, inpaint, upscale over Components
    ("metrics",),  # evaluation: statistics, judges, zero-shot accuracy, CLIP score
    ("training",),  # the training stages (a CLIP run logs metrics' zero-shot accuracy)
    ("explain",),  # figures of how latent diffusion works (pipelines, the reconstruction metrics); the server's page
    ("api", "server", "commands", "cli", "__main__"),  # the front ends, which may import each other
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the daguerre modules it imports anywhere in its body (TYPE_CHECKING blocks excluded)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                   for child in node.body for n in ast.walk(child)}
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                for a in node.names:  # a submodule by name, else the module the name lives in
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        graph[name] = {_owner(t, modules) for t in targets if _owner(t, modules)} - {name}
    return graph


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _owner(target: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted import names (`daguerre.a.b.func` -> `daguerre.a.b`), None outside daguerre."""
    parts = target.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def unit(module: str) -> str:
    """The layer entry a module belongs to: `daguerre.models.bert` -> "models"; entry points -> "__main__"."""
    parts = module.split(".")
    return "__main__" if parts[-1] == "__main__" else parts[1] if len(parts) > 1 else parts[0]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a higher layer, or of another package of the same layer below the front ends."""
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    top = len(LAYERS) - 1
    out = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            ua, ub = unit(a), unit(b)
            if ua == ub:
                continue
            if ua not in rank or ub not in rank:
                out.append(f"{a} -> {b}: place {ua if ua not in rank else ub!r} in LAYERS (and docs/design.md)")
            elif rank[ub] > rank[ua] or (rank[ub] == rank[ua] and rank[ua] != top):
                out.append(f"{a} -> {b}: {ua} (layer {rank[ua]}) may not import {ub} (layer {rank[ub]})")
    return out


def test_the_graph_is_read_with_local_imports():
    graph = import_graph()
    assert "daguerre.limits" in graph["daguerre.pipelines.request"]  # a module-level import
    assert "daguerre.pipelines.txt2img" in graph["daguerre.commands.generate"]  # one inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_layer_rules_catch_an_upward_or_sideways_import():
    assert layer_violations({"daguerre.models.bert": {"daguerre.checkpoints.io"}}) == [
        "daguerre.models.bert -> daguerre.checkpoints.io: models (layer 3) may not import checkpoints (layer 5)"]
    assert layer_violations({"daguerre.diffusion.samplers": {"daguerre.models.unet"}})
    assert layer_violations({"daguerre.weights.io": {"daguerre.data.folder"}})  # same layer, not front ends
    assert layer_violations({"daguerre.newpkg.x": {"daguerre.config"}})  # a new package must be placed
    assert not layer_violations({"daguerre.commands.train": {"daguerre.cli", "daguerre.training.ldm"},
                                 "daguerre.training.__main__": {"daguerre.cli"}})


def test_imports_follow_the_layers():
    found = layer_violations(import_graph())
    assert not found, "imports against the layers (tests/test_layers.py LAYERS):\n" + "\n".join(found)


def test_the_run_config_is_a_leaf_of_training():
    """training/config.py imports no other training module (issue 14: it lazily imported the feature modules
    that import it), so any part of training can read the run schema."""
    assert not {m for m in import_graph()["daguerre.training.config"] if m.startswith("daguerre.training.")}


def test_one_definition_of_each_loader_and_registry():
    """Issue 14: two `build_components`, two `SAMPLERS` (one silently holding fewer samplers) and a VAE loader
    that bypassed the strict one. Each of these names is defined at module level in exactly one module."""
    names = {"build_components": [], "state_dicts": [], "instantiate": [], "load_vae": [], "save_vae": [],
             "read_state_dict": [], "SAMPLERS": [], "resolve_sampler": []}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined = [t.id for t in targets if isinstance(t, ast.Name)]
            else:
                continue
            for name in defined:
                if name in names:
                    names[name].append(module_name(path))
    assert {k: v for k, v in names.items() if len(v) != 1} == {}
