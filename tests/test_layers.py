"""The package's import directions, as ``docs/architecture.md`` states them.

Every module of ``masq_fx`` is parsed with :mod:`ast` (nothing is imported) and each of its imports of
``masq_fx.*`` is checked against :data:`ALLOWED`, module level and function level alike; imports
under ``if TYPE_CHECKING:`` are annotations only and are not checked. A module's *room* is its
first path component under ``masq_fx/``: a package (``capture``, ``transforms``, …) or a top-level
module (``pipeline``, ``replay``, …); ``__init__`` is the package's own ``masq_fx/__init__.py``.
Imports within a room are always allowed.

A new room, or a new import direction, is a design decision: add it to :data:`ALLOWED` and to the
table in ``docs/architecture.md`` together.
"""

from __future__ import annotations

import ast
import graphlib
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "masq_fx"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: every room below the API
LIBRARY = set(
    "resume checkpoint generation replay backends recipes memory eval data sequential offload transforms calibration pipeline capture nn models modality quantizers files pages distributed errors".split()
)

#: room → the other rooms its modules may import (bottom floor first; the same table as docs/architecture.md)
ALLOWED: dict[str, set[str]] = {
    # numerics and shared vocabulary
    "errors": set(),
    "files": set(),
    "pages": set(),
    "distributed": {"errors"},
    "modality": {"errors"},
    "quantizers": {"errors"},
    # what a model is, and the modules a transformed graph holds
    "models": {"modality", "errors"},
    "data": {"modality", "errors"},
    "capture": {"models", "modality", "errors"},
    "nn": {"capture", "modality", "quantizers", "errors"},
    # stages 1-3: pipeline machinery, calibration, transforms
    "pipeline": {"capture", "nn", "models", "modality", "quantizers", "errors"},
    "calibration": {"pipeline", "capture", "nn", "models", "modality", "quantizers", "distributed", "errors"},
    "transforms": {"calibration", "pipeline", "capture", "nn", "models", "modality", "quantizers", "files", "distributed", "errors"},
    "offload": {"transforms", "capture", "nn", "pages", "files"},
    "sequential": {"transforms", "calibration", "pipeline", "capture", "nn", "models", "modality", "pages", "distributed", "errors"},
    # stage 4 and running / persisting a transformed graph
    "backends": {"capture", "nn", "models", "modality", "quantizers", "errors"},
    "replay": {"transforms", "pipeline", "capture", "nn", "models", "modality", "quantizers", "files", "errors"},
    "generation": {"replay", "backends", "capture", "nn", "models", "modality", "quantizers", "errors"},
    "recipes": {"transforms", "calibration", "pipeline", "backends", "capture", "nn", "models", "modality", "quantizers", "files", "errors"},
    "checkpoint": {"replay", "recipes", "transforms", "calibration", "capture", "nn", "models", "modality", "quantizers", "files", "distributed", "errors"},
    "resume": {"checkpoint", "replay", "recipes", "transforms", "pipeline", "models", "modality", "files", "distributed", "errors"},
    "eval": {"generation", "data", "capture", "nn", "models", "modality", "quantizers", "errors"},
    "memory": {"recipes", "transforms", "calibration", "pipeline", "capture", "nn", "models", "modality", "quantizers", "files", "errors"},
    # the API and the package's face
    "api": set(LIBRARY),
    "__init__": LIBRARY | {"api"},
    # the built-in models and the application
    "builtin": {"eval", "generation", "data", "capture", "models", "modality", "errors"},
    "app": LIBRARY | {"api", "__init__", "builtin"},
    "__main__": {"app"},
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported masq_fx module, dotted
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room_of(module: str) -> str:
    """``masq_fx.capture.decoder`` → ``capture``; ``masq_fx.pipeline`` → ``pipeline``; ``masq_fx`` → ``__init__``."""
    parts = module.split(".")
    assert parts[0] == PACKAGE, module
    return parts[1] if len(parts) > 1 else "__init__"


def _is_module(dotted: str) -> bool:
    path = ROOT.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> list[Import]:
    """Every import of a ``masq_fx`` module in ``path``, at any depth, except under ``if TYPE_CHECKING:``."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    found.append(Import(module, alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == PACKAGE or source.startswith(PACKAGE + "."):
                for alias in node.names:  # ``from masq_fx import checkpoint`` imports the submodule
                    submodule = f"{source}.{alias.name}"
                    found.append(Import(module, submodule if _is_module(submodule) else source, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return list(dict.fromkeys(found))  # ``from m import a, b``: one import of ``m``


MODULES = sorted(ROOT.rglob("*.py"))


def test_every_room_is_declared():
    rooms = {room_of(module_name(path)) for path in MODULES}
    assert not rooms - ALLOWED.keys(), f"rooms missing from ALLOWED (and docs/architecture.md): {sorted(rooms - ALLOWED.keys())}"
    for room, allowed in ALLOWED.items():
        assert allowed <= ALLOWED.keys(), f"ALLOWED[{room!r}] names undeclared rooms {sorted(allowed - ALLOWED.keys())}"


def test_docs_state_the_same_table():
    """``docs/architecture.md``'s "may import" table is :data:`ALLOWED`, row for row."""
    doc: dict[str, set[str]] = {}
    for line in (ROOT.parent / "docs" / "architecture.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        room, rule = cells[0].split("`")[1], cells[1].replace("`", "")
        if rule.startswith("every room except "):
            doc[room] = set(ALLOWED) - {room} - {r.strip() for r in rule.removeprefix("every room except ").split(",")}
        else:
            doc[room] = set() if rule == "—" else {r.strip() for r in rule.split(",")}
    assert doc == ALLOWED, {room: (doc.get(room), ALLOWED.get(room)) for room in doc.keys() | ALLOWED.keys() if doc.get(room) != ALLOWED.get(room)}


def test_allowed_table_has_no_cycles():
    """The table itself is a direction: no two rooms may import each other, even through a third."""
    try:
        graphlib.TopologicalSorter({room: allowed - {room} for room, allowed in ALLOWED.items()}).prepare()
    except graphlib.CycleError as error:
        pytest.fail(f"ALLOWED has an import cycle: {' -> '.join(error.args[1])}")


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_imports_follow_the_layers(path: Path):
    room = room_of(module_name(path))
    allowed = ALLOWED.get(room, set()) | {room}
    bad = [i for i in imports_of(path) if room_of(i.target) not in allowed]
    if bad:
        pytest.fail(
            "\n".join(
                f"{i.module} (room {room!r}, line {i.line}) imports {i.target} (room {room_of(i.target)!r}); "
                f"rule: {room!r} may import only {sorted(ALLOWED.get(room, set()))}"
                for i in bad
            ),
            pytrace=False,
        )


def test_app_and_builtin_are_imported_only_from_above():
    """Nothing imports the application but itself and ``__main__``; the built-in models are the application's."""
    bad = []
    for path in MODULES:
        room = room_of(module_name(path))
        for i in imports_of(path):
            target = room_of(i.target)
            if target == "app" and room not in ("app", "__main__"):
                bad.append(f"{i.module} (line {i.line}) imports {i.target}: only app and __main__ may import masq_fx.app")
            if target == "builtin" and room not in ("builtin", "app"):
                bad.append(f"{i.module} (line {i.line}) imports {i.target}: only app may import masq_fx.builtin")
    if bad:
        pytest.fail("\n".join(bad), pytrace=False)


def test_the_scanner_sees_every_kind_of_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Function-level and relative imports count; ``if TYPE_CHECKING:`` bodies do not."""
    package = tmp_path / PACKAGE / "capture"
    package.mkdir(parents=True)
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (tmp_path / PACKAGE / "checkpoint.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "dataflow.py").write_text("")
    source = package / "decoder.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import masq_fx.models.base\n"
        "from masq_fx import checkpoint, Modality\n"
        "from ..pipeline import Context\n"
        "from . import dataflow\n"
        "if TYPE_CHECKING:\n"
        "    from masq_fx.calibration import ModalityStats\n"
        "else:\n"
        "    from masq_fx.recipes import Recipe\n"
        "def f():\n"
        "    from masq_fx.transforms.prepare import quant_linears\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / PACKAGE)
    targets = [i.target for i in imports_of(source)]
    assert targets == [
        "masq_fx.models.base",
        "masq_fx.checkpoint",
        "masq_fx",
        "masq_fx.pipeline",
        "masq_fx.capture.dataflow",
        "masq_fx.recipes",
        "masq_fx.transforms.prepare",
    ]
