"""Which library files a piece of code runs: the transitive closure of its ``kidney_seg`` imports.

A workflow rule lists these files as its ``code`` inputs (so that editing one reruns the
rule), and training hashes them into its resume key; both come from here, read from the
source with :mod:`ast`, so that no hand-written list can drift from the imports.
Imports inside functions count (they run when the function does); imports under
``if TYPE_CHECKING:`` do not. Importing ``kidney_seg.a.b`` also runs the ``__init__.py`` of
each package on the way, which is therefore part of the closure.
"""

from __future__ import annotations

import ast
import functools
import os
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "kidney_seg"
#: The folder holding the ``kidney_seg`` package.
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _is_type_checking(node: ast.AST) -> bool:
    """Whether ``node`` is an ``if TYPE_CHECKING:`` block (its imports never run)."""
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


#: The fields of a node that hold statements (an import is a statement: nothing else can hold one).
STATEMENT_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


def _statements(nodes) -> Iterator[ast.AST]:
    """Every statement in ``nodes`` and the blocks below them, except those under ``if TYPE_CHECKING:``."""
    for node in nodes:
        if _is_type_checking(node):
            continue
        yield node
        for field in STATEMENT_FIELDS:
            yield from _statements(getattr(node, field, None) or ())


def module_path(module: str, root: Path = SOURCE_ROOT) -> Path | None:
    """The source file of a dotted module name under ``root`` (None: not a module there)."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path, root: Path) -> str:
    """The dotted name of a source file under ``root``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The module an ``ImportFrom`` reads, relative imports resolved against ``importer``."""
    if not node.level:
        return node.module or ""
    parts = importer.split(".") if importer else []
    parts = parts if is_package else parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def imported_modules(path: str | os.PathLike, root: Path = SOURCE_ROOT) -> set[str]:
    """The ``kidney_seg`` modules one source file imports directly (dotted names that exist under ``root``)."""
    path = Path(path)
    try:
        importer = _module_name(path.resolve(), root)
    except ValueError:  # a script outside the package
        importer = ""
    found = _imported_names(path.read_text(), str(path), importer, path.name == "__init__.py")
    return {m for m in found if (m == PACKAGE or m.startswith(PACKAGE + ".")) and module_path(m, root)}


@functools.lru_cache(maxsize=1024)
def _imported_names(source: str, filename: str, importer: str, is_package: bool) -> frozenset[str]:
    """Every module (and ``from`` name) a source text imports outside ``if TYPE_CHECKING:``.

    Parsed once per text: the closures of a Snakefile's rules, and each training run's
    resume key, read the same library files over and over.
    """
    found: set[str] = set()
    for node in _statements(ast.parse(source, filename=filename).body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, importer, is_package)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return frozenset(found)


def _with_packages(module: str) -> list[str]:
    """A module and the packages above it, whose ``__init__.py`` runs first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def module_closure(paths, root: Path = SOURCE_ROOT) -> list[Path]:
    """Every ``kidney_seg`` source file that importing the given files runs, sorted."""
    seen: set[Path] = set()
    todo = [Path(p) for p in paths]
    while todo:
        for module in imported_modules(todo.pop(), root):
            for name in _with_packages(module):
                file = module_path(name, root)
                if file is not None and file not in seen:
                    seen.add(file)
                    todo.append(file)
    return sorted(seen)


def script_code(script: str | os.PathLike, root: Path = SOURCE_ROOT) -> list[Path]:
    """The library files a workflow script runs (a rule's ``code`` inputs)."""
    return module_closure([script], root)


def training_code(root: Path = SOURCE_ROOT) -> list[Path]:
    """The library files that shape a training run: :mod:`kidney_seg.training` and all it imports."""
    training = module_path(f"{PACKAGE}.training", root)
    if training is None:
        raise FileNotFoundError(f"no {PACKAGE}/training.py under {root}")
    return sorted({training, *module_closure([training], root)})


def missing_code(script: str | os.PathLike, declared, root: Path = SOURCE_ROOT) -> list[str]:
    """Library files the script runs that ``declared`` (a rule's code inputs) lacks, relative to ``root``."""
    have = {Path(p).resolve() for p in declared}
    return [str(f.relative_to(root)) for f in script_code(script, root) if f.resolve() not in have]


def workflow_script_code(workflow_dir: str | os.PathLike, script: str) -> list[str]:
    """A rule's ``code`` inputs: the library files ``<workflow_dir>/workflow_scripts/<script>.py`` runs."""
    path = Path(workflow_dir) / "workflow_scripts" / f"{script}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no workflow script {path}")
    return [str(p) for p in script_code(path)]
