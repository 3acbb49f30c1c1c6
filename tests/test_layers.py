"""The package's layers: every import of every module (lazy ones inside functions included) goes
one way, lowest first, and no module imports itself back through others.

    storage, distributed   leaves: no project import
    modules                model parts only
    data                   decoding, tokenizing, prepare, packing, streams; of modules only the layout
    training, curate       the stage runtime; curation (beside each other, neither imports the other)
    inference              the model folder (read with training's weight I/O), generation, chat
    evaluation             benchmark readers and scoring, on inference
    world                  the tiny world, built from the layers below
    recipe                 the recipe runner
    cli                    the `kangaroo` command
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kangaroo"

LAYERS = [
    ("kangaroo.storage", "kangaroo.distributed"),
    ("kangaroo.modules",),
    ("kangaroo.data",),
    ("kangaroo.training", "kangaroo.curate"),
    ("kangaroo.inference",),
    ("kangaroo.evaluation",),
    ("kangaroo.world",),
    ("kangaroo.recipe",),
    ("kangaroo.cli",),
]
DATA_MAY_IMPORT_FROM_MODULES = ("kangaroo.modules.layout",)


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every project module ``path`` imports, at any depth of the file."""
    this = module_name(path, root)
    package = this if path.name == "__init__.py" else this.rsplit(".", 1)[0]
    modules = {module_name(p, root) for p in root.rglob("*.py")}
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from kangaroo import storage` imports the module kangaroo.storage
            named = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            found += [(node.lineno, name) for name in named] or [(node.lineno, base)]
    return [(line, name) for line, name in found if name == root.name or name.startswith(root.name + ".")]


def layer_of(name: str) -> tuple[int, str] | None:
    for rank, owners in enumerate(LAYERS):
        for owner in owners:
            if name == owner or name.startswith(owner + "."):
                return rank, owner
    return None


def violations(root: Path) -> list[str]:
    """One line per import against the order, naming the file, its line and the import."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        source = module_name(path, root)
        where = layer_of(source)
        for line, target in imports_of(path, root):
            into = layer_of(target)
            place = f"{path.relative_to(root.parent)}:{line} imports {target}"
            if where is None or into is None:
                if source != root.name and target != root.name:
                    problems.append(f"{place}: a module outside the layers ({source if where is None else target})")
                continue
            (rank, owner), (target_rank, target_owner) = where, into
            if owner == target_owner:
                continue
            if target_rank >= rank:
                problems.append(f"{place}: {owner} (layer {rank}) may not import {target_owner} (layer {target_rank})")
            elif owner == "kangaroo.data" and target_owner == "kangaroo.modules" and target not in DATA_MAY_IMPORT_FROM_MODULES:
                problems.append(f"{place}: data may import from modules only {', '.join(DATA_MAY_IMPORT_FROM_MODULES)}")
    return problems


def cycles(root: Path) -> list[list[str]]:
    """Import cycles between modules, each as the list of modules around it."""
    graph = {module_name(p, root): {t for _, t in imports_of(p, root)} for p in root.rglob("*.py")}
    found, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append(trail[trail.index(target):] + [target] if target in trail else [node, target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return found


def test_every_import_follows_the_layers():
    problems = violations(PACKAGE)
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_no_module_imports_itself_back():
    found = cycles(PACKAGE)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_every_package_module_is_in_a_layer():
    outside = [module_name(p, PACKAGE) for p in PACKAGE.rglob("*.py")
               if module_name(p, PACKAGE) != "kangaroo" and layer_of(module_name(p, PACKAGE)) is None]
    assert not outside, f"modules in no layer of this test: {outside}"


# -- the checks themselves, on a small package written here -------------------------------------

def write_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "kangaroo"
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in {p.parent for p in package.rglob("*.py")} | {package}:
        (folder / "__init__.py").touch()
    return package


@pytest.mark.parametrize("name, text, expected", [
    ("data/encode.py", "def f():\n    from kangaroo.training.stage import KangarooStage\n",
     "kangaroo/data/encode.py:2 imports kangaroo.training.stage: kangaroo.data (layer 2) may not import kangaroo.training"),
    ("data/encode.py", "from kangaroo.modules.builder import build_kangaroo\n",
     "kangaroo/data/encode.py:1 imports kangaroo.modules.builder: data may import from modules only"),
    ("modules/model.py", "from kangaroo import storage, world\n",
     "kangaroo/modules/model.py:1 imports kangaroo.world: kangaroo.modules (layer 1) may not import kangaroo.world"),
    ("curate/filters.py", "import kangaroo.training.weights\n",
     "kangaroo/curate/filters.py:1 imports kangaroo.training.weights: kangaroo.curate (layer 3) may not import"),
    ("storage.py", "from .modules import layout\n",
     "kangaroo/storage.py:1 imports kangaroo.modules.layout: kangaroo.storage (layer 0) may not import"),
])
def test_an_import_against_the_order_is_named(tmp_path, name, text, expected):
    package = write_package(tmp_path, {"modules/layout.py": "", "modules/builder.py": "", "training/stage.py": "",
                                       "training/weights.py": "", "world/render.py": "", "storage.py": "", name: text})
    problems = violations(package)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_a_cycle_is_named(tmp_path):
    package = write_package(tmp_path, {"training/weights.py": "def f():\n    from kangaroo.training import fsdp\n",
                                       "training/fsdp.py": "from kangaroo.training.weights import f\n"})
    assert violations(package) == []  # one package: the order allows it, the cycle check does not
    assert cycles(package) == [["kangaroo.training.fsdp", "kangaroo.training.weights", "kangaroo.training.fsdp"]]
