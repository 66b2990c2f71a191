"""The package's shape, read from its source with `ast` (nothing is imported): imports run one way, and the Triton
kernels' arguments are laid out by role and passed by name.

Import cycles: every `import` / `from ... import` anywhere in a module of deepfense/ (top level, inside functions or
branches: a deferred import is still a dependency), absolute or relative, is an edge to the deepfense module it
names; `from package import name` is an edge to the submodule `package.name` when that is a module, else to the
package. A package's own `__init__` that Python runs before a submodule is not an edge (every submodule would
otherwise depend on it). Any cycle fails, printed as the chain of modules with the line of each import.

Kernel signatures: a launched kernel is a function named `_*_kernel` under deepfense/kernels/ with a decorator. Its
arguments fall into roles, in this order:
  1. pointers      names ending `_ptr`;
  2. sizes         plain arguments before the first stride (all plain arguments when there is no stride);
  3. strides       names starting `stride_`;
  4. scalars       plain arguments after the first stride;
  5. flags         annotated `tl.constexpr`, not a block;
  6. blocks        `tl.constexpr` whose name starts `BLOCK_` or ends `_BLOCK`.
The roles must appear in that order (a stride after a scalar, a pointer after a size, a plain argument after a
constexpr all fail), no source line may hold arguments of two roles (one line, or a run of lines, per role), and the
docstring must name every pointer (its name without `_ptr`, e.g. "X [B, D]") so the shapes are documented.

Calls: a kernel launch `kernel[grid](...)` passes no argument by position (keywords, and `**` splats of named
arguments, only); a call to a jit helper of the package passes its `tl.constexpr` parameters by keyword and at most
MAX_POSITIONAL arguments by position.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "deepfense"
KERNELS = PACKAGE / "kernels"
MAX_POSITIONAL = 16
ROLES = ("pointer", "size", "stride", "scalar", "flag", "block")


# ---- import cycles -------------------------------------------------------------------------------------------------

def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT, package: str = "deepfense") -> Dict[str, Dict[str, int]]:
    """{module: {imported deepfense module: line of the first such import}} over every module under root/package."""
    files = {_module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: Dict[str, Dict[str, int]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges: Dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod for a in node.names]
            for target in targets:
                while target and target not in files:  # `import deepfense.x.y` names deepfense.x.y
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def find_cycle(graph: Dict[str, Dict[str, int]]) -> Optional[List[str]]:
    """One import cycle as [m0, m1, ..., m0], or None (depth-first search, deterministic order)."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def _describe(cycle: List[str], graph) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 20 and graph["deepfense.kernels.ops"], "the import graph was not read"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + _describe(cycle, graph)


def test_the_cycle_finder_sees_a_deferred_relative_import_cycle(tmp_path):
    """A planted cycle through a deferred relative import inside a function, and a clean tree beside it."""
    pkg = tmp_path / "deepfense" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from . import b\n\ndef f():\n    return b.g()\n")
    (pkg / "b.py").write_text("def g():\n    from .a import f  # deferred\n    return f\n")
    graph = import_graph(tmp_path)
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"deepfense.sub.a", "deepfense.sub.b"}, (cycle, graph)
    assert "line 2" in _describe(cycle, graph)
    (pkg / "b.py").write_text("def g():\n    return 1\n")
    assert find_cycle(import_graph(tmp_path)) is None


# ---- kernel signatures and calls -----------------------------------------------------------------------------------

def _is_constexpr(arg: ast.arg) -> bool:
    return arg.annotation is not None and ast.unparse(arg.annotation).endswith("constexpr")


def signature_roles(fn: ast.FunctionDef) -> List[Tuple[str, str, int]]:
    """(name, role, line) of each argument of `fn` (see the module docstring)."""
    args = fn.args.args
    first_stride = next((i for i, a in enumerate(args) if a.arg.startswith("stride_")), len(args))
    out = []
    for i, a in enumerate(args):
        if _is_constexpr(a):
            role = "block" if a.arg.startswith("BLOCK_") or a.arg.endswith("_BLOCK") else "flag"
        elif a.arg.endswith("_ptr"):
            role = "pointer"
        elif a.arg.startswith("stride_"):
            role = "stride"
        else:
            role = "size" if i < first_stride else "scalar"
        out.append((a.arg, role, a.lineno))
    return out


def signature_problems(fn: ast.FunctionDef) -> List[str]:
    """What breaks the layout rule in kernel `fn`'s signature and docstring."""
    roles = signature_roles(fn)
    problems = []
    for (a, ra, _), (b, rb, _) in zip(roles, roles[1:]):
        if ROLES.index(rb) < ROLES.index(ra):
            problems.append(f"{fn.name}: {b} ({rb}) comes after {a} ({ra})")
    lines: Dict[int, set] = {}
    for name, role, line in roles:
        lines.setdefault(line, set()).add(role)
    problems += [f"{fn.name}: line {line} mixes {sorted(r)}" for line, r in sorted(lines.items()) if len(r) > 1]
    doc = ast.get_docstring(fn) or ""
    words = set(doc.replace("[", " ").replace(",", " ").replace(";", " ").replace(":", " ").split())
    problems += [f"{fn.name}: the docstring does not name {name[:-4]}" for name, role, _ in roles
                 if role == "pointer" and name[:-4] not in words]
    return problems


def _kernel_trees():
    return {p: ast.parse(p.read_text(), str(p)) for p in sorted(KERNELS.glob("*.py"))}


def _kernels(trees):
    return [fn for tree in trees.values() for fn in ast.walk(tree)
            if isinstance(fn, ast.FunctionDef) and fn.decorator_list and fn.name.startswith("_")
            and fn.name.endswith("_kernel")]


def _jit_helpers(trees) -> Dict[str, ast.FunctionDef]:
    return {fn.name: fn for tree in trees.values() for fn in ast.walk(tree)
            if isinstance(fn, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in fn.decorator_list)
            and not fn.name.endswith("_kernel")}


def call_problems(tree: ast.AST, helpers: Dict[str, ast.FunctionDef], where: str) -> List[str]:
    """Launches with positional arguments, and helper calls with constexprs by position or too many positional."""
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Subscript) and ast.unparse(func.value).endswith("_kernel") and node.args:
            problems.append(f"{where}:{node.lineno}: {ast.unparse(func.value)} launched with {len(node.args)} "
                            "positional argument(s)")
        elif isinstance(func, ast.Name) and func.id in helpers:
            params = helpers[func.id].args.args
            if len(node.args) > MAX_POSITIONAL:
                problems.append(f"{where}:{node.lineno}: {func.id} called with {len(node.args)} positional arguments")
            by_position = [p.arg for p in params[:len(node.args)] if _is_constexpr(p)]
            if by_position:
                problems.append(f"{where}:{node.lineno}: {func.id} gets constexpr {by_position} by position")
    return problems


def test_kernel_signatures_are_grouped_by_role_and_documented():
    trees = _kernel_trees()
    kernels = _kernels(trees)
    assert len(kernels) >= 6, [k.name for k in kernels]
    problems = [p for fn in kernels for p in signature_problems(fn)]
    assert not problems, "\n".join(problems)


def test_kernels_are_launched_and_helpers_called_by_name():
    trees = _kernel_trees()
    helpers = _jit_helpers(trees)
    assert "_grad_tile" in helpers and "_dot_tile" in helpers
    problems = [p for path, tree in trees.items() for p in call_problems(tree, helpers, path.name)]
    assert not problems, "\n".join(problems)


MISORDERED = '''
@triton.jit
def _bad_kernel(X_ptr, B, stride_x, n_tiles, stride_y, EPS: tl.constexpr, Y_ptr,
                BLOCK_B: tl.constexpr, FLAG: tl.constexpr):
    """X [B]."""
'''

GOOD = '''
@triton.jit
def _good_kernel(X_ptr, Y_ptr,
                 B,
                 stride_x,
                 eps,
                 FLAG: tl.constexpr,
                 BLOCK_B: tl.constexpr):
    """X [B], Y [B]."""

@triton.jit
def _helper(a, b, FLAG: tl.constexpr):
    return a

def launch(x):
    _good_kernel[(1,)](X_ptr=x, **dict(Y_ptr=x), B=1, stride_x=1, eps=0.0, FLAG=True, BLOCK_B=16)
    _good_kernel[(1,)](x, x, 1, 1, 0.0, True, 16)
    _helper(1, 2, True)
    _helper(1, 2, FLAG=True)
'''


def test_the_layout_rules_catch_a_planted_misordered_kernel():
    bad = next(n for n in ast.walk(ast.parse(MISORDERED)) if isinstance(n, ast.FunctionDef))
    problems = "\n".join(signature_problems(bad))
    for expected in ("stride_y (stride) comes after n_tiles (scalar)", "Y_ptr (pointer) comes after EPS",
                     "FLAG (flag) comes after BLOCK_B", "mixes", "does not name Y"):
        assert expected in problems, problems
    tree = ast.parse(GOOD)
    good = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_good_kernel")
    assert signature_problems(good) == []
    helpers = {"_helper": next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_helper")}
    calls = call_problems(tree, helpers, "planted")
    assert len(calls) == 2 and "7 positional" in calls[0] and "['FLAG'] by position" in calls[1], calls
