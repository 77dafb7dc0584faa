"""The package in layers: the library (loading, export, conversion, data, metrics, overlays, ...) sits under the
commands, never imports one, and no command imports another. Read from the source with `ast`, so an import inside a
function counts as much as one at the top."""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

# The modules a user runs; each may import the library, none may import another command.
COMMANDS = {
    "gsva_hf.segment": "gsva_hf/segment.py",  # gsva-segment
    "gsva_hf.convert_gsva_to_hf": "gsva_hf/convert_gsva_to_hf.py",  # gsva-convert-to-hf
    "gsva_hf.hub": "gsva_hf/hub.py",  # gsva-push (main, refresh_main)
    "gsva_hf.compose": "gsva_hf/compose.py",  # gsva-compose (and compose_gsva, its Python call)
    "eval_hf": "eval_hf.py",
    "train_hf": "train_hf.py",
    "demo.app": "demo/app.py",
}
# The library: the Hub files and every module of the gsva_hf package that is not a command (the bundled model's
# copies of the Hub files under assets/ are data, not code of this package).
LIBRARY_FILES = ["configuration_gsva.py", "modeling_gsva.py", "processing_gsva.py", "pipeline_gsva.py"]
LIBRARY_PACKAGE = "gsva_hf"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, Path]:
    found = {module_name(REPO / name): REPO / name for name in LIBRARY_FILES if (REPO / name).is_file()}
    for path in sorted((REPO / LIBRARY_PACKAGE).rglob("*.py")):
        if "assets" in path.relative_to(REPO).parts:
            continue
        name = module_name(path)
        if name not in COMMANDS:
            found[name] = path
    return found


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Every module `path` (or `source`, read as if it were `path`) imports, relative imports resolved;
    `from package import name` also counts `package.name`, which may be a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    source = path.read_text(encoding="utf-8") if source is None else source
    found = set()
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def commands_in(names: set[str]) -> list[str]:
    return sorted(command for command in COMMANDS if any(n == command or n.startswith(command + ".") for n in names))


def test_the_lists_name_real_modules():
    missing = [path for path in COMMANDS.values() if not (REPO / path).is_file()]
    assert not missing, f"COMMANDS names files that do not exist: {missing}"
    library = library_modules()
    for expected in ("gsva_hf.loading", "gsva_hf.export", "gsva_hf.overlay", "gsva_hf.conversion", "processing_gsva"):
        assert expected in library


@pytest.mark.parametrize("name", sorted(library_modules()))
def test_the_library_imports_no_command(name):
    path = library_modules()[name]
    used = commands_in(imported_modules(path))
    assert not used, f"{path.relative_to(REPO)} (library) imports the command module(s) {used}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_no_command_imports_another(name):
    path = REPO / COMMANDS[name]
    used = [other for other in commands_in(imported_modules(path)) if other != name]
    assert not used, f"{COMMANDS[name]} (a command) imports the command module(s) {used}; move what it needs to the library"


def test_the_library_has_no_import_cycles():
    """Modules that import each other (even inside functions) are one piece split in two; a shared lower module
    (e.g. `data.refer_specs` under `data.refer_seg` and `data.hf_datasets`) is the fix."""
    library = library_modules()
    graph = {name: sorted(n for n in imported_modules(path) if n in library and n != name) for name, path in library.items()}
    state, cycles = {}, []

    def visit(name, trail):
        state[name] = "open"
        for other in graph[name]:
            if state.get(other) == "open":
                cycles.append(" -> ".join(trail[trail.index(other):] + [other]))
            elif other not in state:
                visit(other, trail + [other])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"library import cycles: {cycles}"


def test_the_import_reader_sees_every_form():
    """The check would pass vacuously if the reader missed an import form: each one here is found."""
    source = (
        "import gsva_hf.hub\n"
        "from gsva_hf import segment\n"
        "def late():\n"
        "    from .loading import load_gsva\n"
        "    from ..segment import main\n"
    )
    found = imported_modules(REPO / LIBRARY_PACKAGE / "data" / "probe.py", source)
    assert {"gsva_hf.hub", "gsva_hf.segment", "gsva_hf.data.loading", "gsva_hf.segment.main"} <= found
    assert commands_in(found) == ["gsva_hf.hub", "gsva_hf.segment"]
