"""The import graph of `hf_fsad`: layers only import downwards, methods do not import each other, no cycles.

Every module under `src/hf_fsad` is parsed with `ast` (nothing is imported), and every import in it counts,
at module level, inside functions or under `TYPE_CHECKING` alike. docs/architecture.md explains the layers.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "hf_fsad"

# Module (or package prefix) -> layer. A module may import its own layer or a lower one, never a higher one;
# the longest matching prefix decides.
LAYERS = {
    # 0: foundations with no model in them: file I/O, configs' base, the output type, the reference bank file,
    # the image processor and pixel checks, prompt text, metrics, datasets, synthetic anomalies, augmentation,
    # drawing, process groups, calibrated thresholds and their report.
    "hf_fsad.io": 0,
    "hf_fsad.deprecation": 0,
    "hf_fsad.configuration_base": 0,
    "hf_fsad.modeling_outputs": 0,
    "hf_fsad.bank": 0,
    "hf_fsad.image_processing": 0,
    "hf_fsad.prompts": 0,
    "hf_fsad.metrics": 0,
    "hf_fsad.data": 0,
    "hf_fsad.synthesis": 0,
    "hf_fsad.augmentation": 0,
    "hf_fsad.visualization": 0,
    "hf_fsad.distributed": 0,
    "hf_fsad.calibration": 0,
    "hf_fsad.calibration_inputs": 0,
    # tiles of large images (geometry and stitching, no model)
    "hf_fsad.tiling": 0,
    "hf_fsad.calibration_report": 0,
    "hf_fsad.progress": 0,
    # the torch-free runner of exported graphs: numpy, Pillow and a runtime only
    "hf_fsad.deploy": 0,
    # int8 quantisation of an exported graph and its error (numpy and the runtimes' quantisers, no model)
    "hf_fsad.quantization": 0,
    # 1: what every method builds on: the CLIP backbone and its converter, shared scoring functions, the
    # feature cache, the model base class and its calibration mixin, the tiny test builders.
    "hf_fsad.backbones": 1,
    "hf_fsad.scoring": 1,
    "hf_fsad.features": 1,
    "hf_fsad.modeling_base": 1,
    "hf_fsad.modeling_calibration": 1,
    # tiled banks, scoring and calibration through the method contract
    "hf_fsad.tiled_scoring": 1,
    # what every trained method shares: the generic training loop and the shared losses (a method's own
    # trainer, in its folder, builds on them).
    "hf_fsad.training.trainer": 1,
    "hf_fsad.training.losses": 1,
    "hf_fsad.testing": 1,
    # 2: the methods, one sub-package each.
    "hf_fsad.models": 2,
    # 3: what uses methods by name or trains them: registration, pipeline, loading, evaluation, the Hub,
    # training, the demo, and the package itself (importing it registers every method).
    "hf_fsad": 3,
    "hf_fsad.registry": 3,
    "hf_fsad.pipeline": 3,
    "hf_fsad.loading": 3,
    "hf_fsad.evaluation": 3,
    "hf_fsad.hub": 3,
    "hf_fsad.training": 3,
    "hf_fsad.demo": 3,
    "hf_fsad.export": 3,
    "hf_fsad.calibration_policy": 3,
    # the papers' tables reproduced through the runner and the trainers
    "hf_fsad.reproduction": 3,
    # what the engines of `hf-fsad score` share (records, scorer), and the Ray engine (ray imported in functions)
    "hf_fsad.batch_scoring": 3,
    "hf_fsad.ray_engine": 3,
    # 4: the command line, the top.
    "hf_fsad.cli": 4,
}

# A method may import another only where it is built on it.
METHOD_BASES = {"anomalous_memory": {"winclip"}}

# The data layer's shared modules; every other module under hf_fsad.data is one dataset (or family).
DATA_SHARED = {
    "hf_fsad.data",
    "hf_fsad.data.common",
    "hf_fsad.data.benchmarks",
    "hf_fsad.data.hub",
    "hf_fsad.data.sampling",
    "hf_fsad.data.synthetic",
}

# Known imports against the layers (none left; an entry needs a reason).
PENDING: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted((SOURCE / PACKAGE).rglob("*.py"))}


def _import_targets(node: ast.AST, package: str, known: set[str]) -> list[str]:
    """The modules an import statement imports, absolute (`from package import submodule` counts as the
    submodule); [] for any other node."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        source = f"{base}.{node.module}" if node.module else base
    else:
        source = node.module
    return [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names]


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The `hf_fsad` modules that `name` imports (`from package import submodule` counts as the submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = _import_targets(node, _package_of(name, path), known)
        found.update(target for target in targets if target == PACKAGE or target.startswith(PACKAGE + "."))
    found.discard(name)
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported_modules(name, path, set(modules)) for name, path in modules.items()}


def _layer(module: str) -> int | None:
    prefixes = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(prefixes, key=len)] if prefixes else None


def _method(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "models" else None


GRAPH = _import_graph()
EDGES = sorted((importer, imported) for importer, targets in GRAPH.items() for imported in targets)


def test_the_parser_sees_relative_absolute_and_function_level_imports():
    # one of each kind, so an empty graph (a parser that finds nothing) cannot pass the tests below
    assert ("hf_fsad.evaluation.runner", "hf_fsad.features") in EDGES  # `from ..features import`
    assert ("hf_fsad.evaluation.runner", "hf_fsad.evaluation.report") in EDGES  # `from .report import`
    assert ("hf_fsad.cli.score", "hf_fsad.distributed") in EDGES  # inside a function, absolute
    assert ("hf_fsad.data", "hf_fsad.data.sampling") in EDGES  # a package's __init__
    assert ("hf_fsad.models.afclip.modeling_afclip", "hf_fsad.modeling_base") in EDGES  # `from ...x`


def test_every_module_has_a_layer():
    assert [module for module in GRAPH if _layer(module) is None] == []


def _violations(edges: list[tuple[str, str]]) -> list[str]:
    """Imports that go up a layer, or from one method to another it is not built on."""
    found = []
    for importer, imported in edges:
        if _layer(imported) > _layer(importer):
            found.append(
                f"{importer} (layer {_layer(importer)}) imports {imported} (layer {_layer(imported)})"
            )
        method, other = _method(importer), _method(imported)
        if method and other and other != method and other not in METHOD_BASES.get(method, set()):
            found.append(f"method {method} imports method {other} ({importer} -> {imported})")
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target] if target in path else [module, target]
            if target not in state and (cycle := visit(target, [*path, target])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_the_checks_catch_an_upward_import_a_method_import_and_a_cycle():
    planted = [
        ("hf_fsad.io", "hf_fsad.cli"),
        ("hf_fsad.models.winclip.m", "hf_fsad.models.afclip.m"),
        ("hf_fsad.models.anomalous_memory.m", "hf_fsad.models.winclip.m"),  # its base method: allowed
    ]
    assert _violations(planted) == [
        "hf_fsad.io (layer 0) imports hf_fsad.cli (layer 4)",
        "method winclip imports method afclip (hf_fsad.models.winclip.m -> hf_fsad.models.afclip.m)",
    ]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_go_downwards_and_methods_stay_apart():
    assert _violations([edge for edge in EDGES if edge not in PENDING]) == []


def test_pending_edges_still_exist():
    # an edge the restructure has removed leaves the allow-list with it
    assert sorted(PENDING - set(EDGES)) == []


def test_no_import_cycles():
    graph = {module: {t for t in targets if (module, t) not in PENDING} for module, targets in GRAPH.items()}
    assert _cycle(graph) is None


def test_no_module_imports_another_modules_private_names():
    private = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                names = [
                    alias.name
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
                private += [
                    f"{module}: from {'.' * node.level}{node.module or ''} import {name}" for name in names
                ]
    assert private == []


# What knows no model: the output type and the bank (its class, file format and checks) live apart from the
# model base, which builds on them.
MODEL_FREE = ("hf_fsad.modeling_outputs", "hf_fsad.bank", "hf_fsad.image_processing")


def _imports_transitively(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for target in GRAPH.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_outputs_and_the_bank_import_no_model():
    model_modules = ("hf_fsad.modeling_base", "hf_fsad.models", "hf_fsad.backbones")
    for module in MODEL_FREE:
        assert module in GRAPH, f"{module} is missing"
        reached = _imports_transitively(module)
        assert [m for m in sorted(reached) if m.startswith(model_modules)] == [], module


def test_the_model_base_imports_the_bank_and_not_the_other_way():
    assert {"hf_fsad.bank", "hf_fsad.modeling_outputs"} <= GRAPH["hf_fsad.modeling_base"]
    assert "hf_fsad.modeling_base" not in _imports_transitively("hf_fsad.bank")


DATASET_MODULES = {
    module for module in GRAPH if module.startswith("hf_fsad.data.") and module not in DATA_SHARED
}


def _data_violations(edges: list[tuple[str, str]], dataset_modules: set[str]) -> list[str]:
    """Imports from one dataset module to another, and from the data layer to anything model-related (every
    layer above the foundations)."""
    found = []
    for importer, imported in edges:
        if importer in dataset_modules and imported in dataset_modules:
            found.append(f"dataset module {importer} imports dataset module {imported}")
        if (importer == "hf_fsad.data" or importer.startswith("hf_fsad.data.")) and _layer(imported) > 0:
            found.append(f"{importer} imports {imported} (layer {_layer(imported)}): data imports no model")
    return found


def test_the_data_checks_catch_a_dataset_importing_another_and_data_importing_a_model():
    planted = [
        ("hf_fsad.data.elpv", "hf_fsad.data.toy"),
        ("hf_fsad.data.elpv", "hf_fsad.data.common"),  # the shared helpers: allowed
        ("hf_fsad.data.benchmarks", "hf_fsad.data.elpv"),  # the table: allowed
        ("hf_fsad.data.hub", "hf_fsad.modeling_base"),
    ]
    assert _data_violations(planted, {"hf_fsad.data.elpv", "hf_fsad.data.toy"}) == [
        "dataset module hf_fsad.data.elpv imports dataset module hf_fsad.data.toy",
        "hf_fsad.data.hub imports hf_fsad.modeling_base (layer 1): data imports no model",
    ]


def test_dataset_modules_import_no_other_dataset_and_data_imports_no_model():
    assert {"hf_fsad.data.elpv", "hf_fsad.data.mvtec_ad", "hf_fsad.data.toy"} <= DATASET_MODULES
    assert _data_violations(EDGES, DATASET_MODULES) == []


def test_every_dataset_module_is_in_the_benchmark_table():
    # the table (`BENCHMARKS` in data/benchmarks.py) imports each dataset module's spec
    assert sorted(DATASET_MODULES - GRAPH["hf_fsad.data.benchmarks"]) == []


# The command line: its package (main, build_parser), shared options and error, and one module per command.
CLI_SHARED = {
    "hf_fsad.cli",
    "hf_fsad.cli.__main__",
    "hf_fsad.cli._errors",
    "hf_fsad.cli._options",
    "hf_fsad.cli._bank_inputs",
    "hf_fsad.cli._engine",
}
COMMANDS = {
    f"hf_fsad.cli.{name}"
    for name in ("score", "calibrate", "fit", "benchmark", "reproduce", "convert", "export", "hub", "demo")
}
# What the command line may import at module level, besides the standard library: `hf-fsad --help` builds
# the parser from these alone, so it loads neither torch nor transformers nor datasets (tests/test_cli.py
# checks the process). Each command imports the rest inside its functions, when it runs.
LIGHT_MODULES = {
    "hf_fsad",
    "hf_fsad.registry",
    "hf_fsad.deprecation",
    "hf_fsad.io",
    "hf_fsad.calibration_policy",
    "hf_fsad.deploy",
    "hf_fsad.deploy.run_exported",
    "hf_fsad.deploy.image_files",
    "hf_fsad.deploy.regions",
    "hf_fsad.tiling",
    # the papers' protocols and published cells (`reproduce --help` lists the papers)
    "hf_fsad.reproduction",
    "hf_fsad.reproduction.protocols",
    "hf_fsad.reproduction.tables",
}
# image_files, regions, tiling: what run_exported.py imports beside an export, the copies of
# hf_fsad.deploy.image_files, hf_fsad.deploy.regions and hf_fsad.tiling.
LIGHT_THIRD_PARTY = {"numpy", "PIL", "image_files", "regions", "tiling"}


def _module_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules `name` imports when it is imported: its imports outside functions and outside
    `if TYPE_CHECKING:` blocks."""
    found = set()
    pending = list(ast.parse(path.read_text(), str(path)).body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            pending += node.orelse
            continue
        found.update(_import_targets(node, _package_of(name, path), known))
        pending += [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]
    found.discard(name)
    return found


def _heavy_module_level_imports(modules: set[str]) -> list[str]:
    known = _modules()
    allowed = LIGHT_MODULES | CLI_SHARED | COMMANDS
    found = []
    for module in sorted(modules):
        for imported in sorted(_module_level_imports(module, known[module], set(known))):
            top = imported.partition(".")[0]
            if imported not in allowed and top not in sys.stdlib_module_names | LIGHT_THIRD_PARTY:
                found.append(f"{module} imports {imported} at module level")
    return found


def test_the_cli_is_one_module_per_command():
    assert {module for module in GRAPH if module.startswith("hf_fsad.cli")} == CLI_SHARED | COMMANDS


def test_commands_import_no_other_command():
    assert [
        f"{importer} imports {imported}" for importer, imported in EDGES if {importer, imported} <= COMMANDS
    ] == []


def test_the_cli_and_what_it_imports_at_module_level_are_light():
    assert _heavy_module_level_imports(CLI_SHARED | COMMANDS | LIGHT_MODULES) == []
    # the check sees a heavy import at module level, and none inside a function or for type checkers only
    found = _heavy_module_level_imports({"hf_fsad.pipeline"})
    assert "hf_fsad.pipeline imports torch at module level" in found
    assert "hf_fsad.pipeline imports transformers at module level" in found
    assert _heavy_module_level_imports({"hf_fsad.calibration_policy"}) == []  # torch inside its functions


def test_ray_is_imported_only_inside_functions():
    # `import hf_fsad` and `hf-fsad --help` must work without the ray extra and not pay for importing it
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(), str(path))
        top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        for node in top_level:
            targets = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            assert not any(target and target.split(".")[0] == "ray" for target in targets), name
