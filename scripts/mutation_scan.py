"""Mutation scan: which one-line changes to a module does a narrow test selection fail to notice?

    PYTHONPATH=src python scripts/mutation_scan.py src/hf_fsad/calibration.py tests/test_calibration.py \
        [more test files or -k selections ...] [--functions fit,labels] [--json out.json]

Each mutant is one small change inside a function or method body (no module-level constants, no error
messages): a comparison's boundary or sense (< <=, > >=, == !=, in / not in, is / is not), an arithmetic
operator (+ -, * /, // /, ** *), and / or, a dropped `not` or unary minus, an integer n -> n + 1 or a
float x -> x + 1 or 0.0 -> 1.0, True / False, min / max (and amin / amax, minimum / maximum, floor / ceil),
an index `[name]` -> `[0]`, a dropped keyword argument, `return value` -> `return None`.

Why not mutmut: its stats phase runs the whole suite (9 minutes here) and every mutant pays a fresh
interpreter and pytest start (10-15 s with torch and transformers) for tests that run in under a second.
Here one parent process imports the package and pytest once; each mutant is a fork in which the mutated
function bodies are swapped in place (`function.__code__`, so every `from ... import name` elsewhere sees
the mutant too) before pytest runs the selection with -x. A mutant is "killed" (a test failed), "survived"
(all passed), "timeout" (ran over --timeout) or "not covered" (the selection never runs its line, found
by a traced baseline run; counted as survived). A mutant whose code cannot be swapped (a changed closure)
is "error" and listed. Tests that start a subprocess do not see the mutant: select in-process tests.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest

SWAPPED_COMPARISONS = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}  # fmt: skip
SWAPPED_OPERATORS = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Pow: ast.Mult, ast.Mod: ast.Mult,
}  # fmt: skip
SWAPPED_NAMES = {
    "min": "max", "max": "min", "amin": "amax", "amax": "amin", "minimum": "maximum", "maximum": "minimum",
    "floor": "ceil", "ceil": "floor",
}  # fmt: skip


def mutations(tree: ast.Module, functions: set[str] | None):
    """Yield (node, function name, description, apply) for every mutation inside function bodies (of
    `functions` only, when given); `mutated_tree` applies one."""
    for top, qualname in _functions(tree):
        if functions and qualname.split(".")[-1] not in functions and qualname not in functions:
            continue
        for node in _body_nodes(top):
            for description, mutate in _node_mutations(node):
                yield node, qualname, description, mutate


def _functions(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, node.name
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield item, f"{node.name}.{item.name}"


def _body_nodes(function: ast.FunctionDef):
    """Nodes of the body and the defaults, skipping docstrings, raise statements and f-strings (messages)."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    stack = [*body, *function.args.defaults, *[d for d in function.args.kw_defaults if d is not None]]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Raise, ast.JoinedStr)):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _node_mutations(node: ast.AST):
    """(description, apply) pairs; `apply` takes the node's copy, changes it and returns its replacement."""
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in SWAPPED_COMPARISONS:
                new = SWAPPED_COMPARISONS[type(op)]
                yield f"{type(op).__name__} -> {new.__name__}", _set_item("ops", i, new)
    elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in SWAPPED_OPERATORS:
        new = SWAPPED_OPERATORS[type(node.op)]
        yield f"{type(node.op).__name__} -> {new.__name__}", _set("op", new)
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        yield f"{type(node.op).__name__} -> {new.__name__}", _set("op", new)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        yield f"drop {type(node.op).__name__}", lambda copied: copied.operand
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
        value = (not node.value) if isinstance(node.value, bool) else node.value + 1
        yield f"{node.value!r} -> {value!r}", _set("value", lambda: value)
    elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in SWAPPED_NAMES:
        new_name = SWAPPED_NAMES[node.id]
        yield f"{node.id} -> {new_name}", _set("id", lambda: new_name)
    elif isinstance(node, ast.Attribute) and node.attr in SWAPPED_NAMES:
        new_name = SWAPPED_NAMES[node.attr]
        yield f".{node.attr} -> .{new_name}", _set("attr", lambda: new_name)
    elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Name):
        yield f"[{node.slice.id}] -> [0]", _set("slice", lambda: ast.Constant(0))
    elif isinstance(node, ast.Call):
        for i, keyword in enumerate(node.keywords):
            if keyword.arg is not None:
                yield f"drop {keyword.arg}=", _drop_keyword(i)
    elif isinstance(node, ast.Return) and not (node.value is None or _is_none(node.value)):
        yield "return None", _set("value", lambda: ast.Constant(None))


def _is_none(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def _set(name: str, make):
    def apply(copied):
        setattr(copied, name, make())
        return copied

    return apply


def _set_item(name: str, index: int, make):
    def apply(copied):
        getattr(copied, name)[index] = make()
        return copied

    return apply


def _drop_keyword(index: int):
    def apply(copied):
        del copied.keywords[index]
        return copied

    return apply


def mutated_tree(tree: ast.Module, target: ast.AST, apply) -> ast.Module:
    """A copy of `tree` with `apply` done to the copy of `target` (found by its place in `ast.walk` order,
    which depends only on the tree's structure)."""
    copied = copy.deepcopy(tree)
    position = next(i for i, node in enumerate(ast.walk(tree)) if node is target)
    parent, node = next((p, c) for i, (p, c) in enumerate(_walk_with_parents(copied)) if i == position)
    replacement = apply(node)
    if replacement is not node:
        _replace_child(parent, node, replacement)
    return ast.fix_missing_locations(copied)


def _walk_with_parents(tree: ast.AST):
    """(parent, node) in `ast.walk` order (the root's parent is None)."""
    from collections import deque

    todo = deque([(None, tree)])
    while todo:
        parent, node = todo.popleft()
        todo.extend((node, child) for child in ast.iter_child_nodes(node))
        yield parent, node


def _replace_child(parent: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for name, value in ast.iter_fields(parent):
        if value is old:
            setattr(parent, name, new)
        elif isinstance(value, list):
            value[:] = [new if item is old else item for item in value]


def swap_in(module: types.ModuleType, tree: ast.Module) -> None:
    """Run the mutated module source in a scratch namespace, then move each function's code, defaults and
    closure-free body into the live function objects, so every existing reference runs the mutant."""
    namespace = {"__name__": module.__name__, "__package__": module.__package__, "__file__": module.__file__}
    exec(compile(tree, module.__file__, "exec"), namespace)  # noqa: S102  (our own source, mutated)
    for name, new in namespace.items():
        old = module.__dict__.get(name)
        if isinstance(new, type) and isinstance(old, type):
            for attribute, new_member in vars(new).items():
                _swap_function(vars(old).get(attribute), new_member)
        else:
            _swap_function(old, new)


def _swap_function(old, new) -> None:
    for unwrap in (lambda f: f, lambda f: getattr(f, "__func__", None), lambda f: getattr(f, "fget", None)):
        old_function, new_function = unwrap(old), unwrap(new)
        old_function = getattr(old_function, "__wrapped__", old_function)  # functools.lru_cache and the like
        new_function = getattr(new_function, "__wrapped__", new_function)
        if (
            isinstance(old_function, types.FunctionType)
            and isinstance(new_function, types.FunctionType)
            and old_function.__code__.co_filename == new_function.__code__.co_filename  # not dataclass's own
        ):
            if old_function.__code__ != new_function.__code__:
                old_function.__code__ = new_function.__code__
            old_function.__defaults__ = new_function.__defaults__
            old_function.__kwdefaults__ = new_function.__kwdefaults__
            if hasattr(old, "cache_clear"):
                old.cache_clear()
            return


class _FirstFailure:
    """pytest plugin: remembers the first failing test's node id."""

    def __init__(self):
        self.nodeid = None

    def pytest_runtest_logreport(self, report):
        if report.failed and self.nodeid is None:
            self.nodeid = report.nodeid


def run_in_child(
    pytest_args: list[str], timeout: float, prepare=None, finish=None
) -> tuple[str, str | None, float]:
    """Fork; in the child do `prepare()`, pytest with `pytest_args`, then `finish()`. Returns (outcome, the
    first failing test, seconds)."""
    report = _scratch_file()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            if prepare is not None:
                prepare()
            failure = _FirstFailure()
            code = int(pytest.main(pytest_args, plugins=[failure]))
            Path(report).write_text(failure.nodeid or "")
            if finish is not None:
                finish()
        finally:
            os._exit(code)
    deadline = start + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.unlink(report)
            return "timeout", None, time.monotonic() - start
        time.sleep(0.05)
    seconds = time.monotonic() - start
    failed_test = Path(report).read_text() or None
    os.unlink(report)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return "survived", None, seconds
    if code == 1:
        return "killed", failed_test, seconds
    return f"error (exit {code})", failed_test, seconds


def _scratch_file() -> str:
    descriptor, name = tempfile.mkstemp(prefix="mutation_scan_")
    os.close(descriptor)
    return name


def covered_lines(module: types.ModuleType, pytest_args: list[str]) -> set[int]:
    """Lines of the module that the test selection executes (one traced run in a child; it must pass)."""
    lines_file = _scratch_file()
    lines: set[int] = set()

    def trace_lines(frame, event, arg):
        if event == "line":
            lines.add(frame.f_lineno)
        return trace_lines

    def trace_calls(frame, event, arg):
        return trace_lines if frame.f_code.co_filename == module.__file__ else None

    def start_tracing():
        sys.settrace(trace_calls)
        threading.settrace(trace_calls)

    def write_lines():
        sys.settrace(None)
        Path(lines_file).write_text(json.dumps(sorted(lines)))

    outcome, failed_test, _ = run_in_child(pytest_args, 1800, start_tracing, write_lines)
    if outcome != "survived":
        raise SystemExit(f"The unmutated module does not pass the selection: {outcome} {failed_test or ''}")
    covered = set(json.loads(Path(lines_file).read_text()))
    os.unlink(lines_file)
    return covered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", help="source file of the module to mutate, e.g. src/hf_fsad/calibration.py")
    parser.add_argument("tests", nargs="+", help="pytest arguments: the narrow test files (and -k ...)")
    parser.add_argument("--functions", help="comma-separated function or Class.method names to mutate only")
    parser.add_argument("--timeout", type=float, help="seconds per mutant (default: 3 x baseline + 10)")
    parser.add_argument("--json", help="write every mutant's outcome here")
    parser.add_argument(
        "--rerun",
        help="an earlier --json of the same source: run only the mutants it did not record as killed "
        "(tests were only added since, so a killed mutant stays killed) and carry the rest over",
    )
    args = parser.parse_args()

    path = Path(args.module).resolve()
    module_name = _module_name(path)
    sys.dont_write_bytecode = True
    module = importlib.import_module(module_name)
    if Path(module.__file__).resolve() != path:
        raise SystemExit(f"{module_name} imports from {module.__file__}, not {path}: set PYTHONPATH.")
    _collect_once(args.tests)

    pytest_args = ["-x", "-q", "-p", "no:cacheprovider", *args.tests]
    tree = ast.parse(path.read_text())
    sites = list(mutations(tree, set(args.functions.split(",")) if args.functions else None))

    start = time.monotonic()
    covered = covered_lines(module, pytest_args) | _header_lines(tree)
    earlier = {}
    if args.rerun:
        earlier = {result["mutant"]: result for result in json.loads(Path(args.rerun).read_text())["mutants"]}
    outcome, _, baseline = run_in_child(pytest_args, 600)
    timeout = args.timeout or 3 * baseline + 10
    print(
        f"{module_name}: {len(sites)} mutants; baseline run {baseline:.1f} s, timeout {timeout:.0f} s",
        flush=True,
    )

    results = []
    for node, qualname, description, apply in sites:
        where = f"{path.name}:{node.lineno} {qualname}: {description}"
        if earlier.get(where, {}).get("outcome") == "killed":
            results.append(earlier[where])
            continue
        if node.lineno not in covered:
            outcome, failed_test, seconds = "not covered", None, 0.0
        else:
            mutant = mutated_tree(tree, node, apply)
            outcome, failed_test, seconds = run_in_child(
                pytest_args, timeout, lambda mutant=mutant: swap_in(module, mutant)
            )
        results.append(
            {"mutant": where, "outcome": outcome, "killed_by": failed_test, "seconds": round(seconds, 1)}
        )
        if outcome != "killed":
            print(f"  {outcome:12s} {where}", flush=True)

    counts = {}
    for result in results:
        counts[result["outcome"]] = counts.get(result["outcome"], 0) + 1
    print(f"{module_name}: {len(results)} mutants {counts} in {time.monotonic() - start:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"module": module_name, "tests": args.tests, "counts": counts, "mutants": results}, indent=1
            )
        )
    return 0


def _collect_once(tests: list[str]) -> None:
    """Import the test modules (and torch, transformers, the tiny models' code) once, here, so the forks
    only run them: pytest finds an imported test module in `sys.modules`."""
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *tests])
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)


def _header_lines(tree: ast.Module) -> set[int]:
    """Lines of `def` headers (default values): run at import, before tracing starts."""
    lines = set()
    for function, _ in _functions(tree):
        lines.update(range(function.lineno, function.body[0].lineno))
    return lines


def _module_name(path: Path) -> str:
    parts = path.with_suffix("").parts
    return ".".join(parts[parts.index("hf_fsad") :])


if __name__ == "__main__":
    sys.exit(main())
