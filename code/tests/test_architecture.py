"""The package's shape, read from its source: which modules import which (every import, at module level or
inside a function), where the import circles are, and how long the modules are. The known exceptions are
listed here and may only shrink: a new module that reaches up into ``profiles``, a new circle or a new long
module fails, and so does an exception that no longer holds (delete it from the list)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "monosemantic"

# Library code should take its config from the caller, not look the profile up itself: `monosemantic` resolves the
# profile once (cli.main sets args.profile_config) and the commands read it from their arguments. These modules
# still look it up (inside their stage functions); the list may only shrink.
IMPORT_PROFILES: set[str] = set()
# entry points that resolve the profile: allowed to import it
ENTRY_POINTS = {"cli", "pipeline", "profiles", "readme", "__main__"}
# modules with a command line of their own (python -m monosemantic.<module>): they resolve the profile in their
# `main` and nowhere else, and pass its configs down
COMMAND_LINES = {"gpurun", "rehearsal"}
# import circles (strongly connected modules); none today, and a new one fails
KNOWN_CIRCLES: list[set[str]] = []
MAX_LINES = 700
LONG_MODULES: set[str] = set()


def modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"
        out[name] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (relative or absolute)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    if not (node.module or "").startswith("monosemantic"):
                        continue
                    target = node.module.removeprefix("monosemantic").lstrip(".")
                for alias in node.names:  # "from . import sae" names a module; "from .sae import SAE" does not
                    sub = f"{target}.{alias.name}" if target else alias.name
                    found.add(sub if sub in mods else target)
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("monosemantic.") for a in node.names
                          if a.name.startswith("monosemantic.")}
        graph[name] = {m for m in found if m in mods and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_reader_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "store" in graph["analysis.stage"] and "tokenizer" in graph["analysis.measure"]  # module level
    assert "sae" in graph["causal"]  # "from . import sae as sae_mod" inside run_stage
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert circles({"a": {"b"}, "b": set()}) == []


def profiles_imports_outside_main(path: Path) -> list[int]:
    """Line numbers of the imports of ``profiles`` in ``path`` that are not inside a function called ``main``."""
    def imports_profiles(node: ast.AST) -> bool:
        return (isinstance(node, ast.ImportFrom) and (any(a.name == "profiles" for a in node.names)
                                                      or (node.module or "").endswith("profiles")))

    tree = ast.parse(path.read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "main"
              for n in ast.walk(f)}
    return [n.lineno for n in ast.walk(tree) if imports_profiles(n) and id(n) not in inside]


def test_command_line_modules_resolve_the_profile_in_main_only(tmp_path):
    mods = modules()
    for name in sorted(COMMAND_LINES):
        lines = profiles_imports_outside_main(mods[name])
        assert not lines, f"{name}.py imports profiles outside main() at lines {lines}; take the config as an " \
                          "argument and resolve it in main()"
    probe = tmp_path / "probe.py"  # the check sees imports at module level and in other functions
    probe.write_text("from . import profiles\n\ndef main():\n    from . import profiles\n\n"
                     "def run():\n    from .profiles import get\n")
    assert profiles_imports_outside_main(probe) == [1, 7]


def test_library_modules_do_not_reach_up_into_the_profiles():
    graph = import_graph()
    importers = {m for m, deps in graph.items() if "profiles" in deps} - ENTRY_POINTS - COMMAND_LINES
    assert not importers - IMPORT_PROFILES, f"new modules import profiles: {sorted(importers - IMPORT_PROFILES)}; " \
                                            "take the config as an argument instead"
    gone = sorted(IMPORT_PROFILES - importers)
    assert not gone, f"these no longer import profiles: {gone}; remove them from IMPORT_PROFILES"


def test_no_new_import_circle():
    found = circles(import_graph())
    for comp in found:
        assert any(comp <= known for known in KNOWN_CIRCLES), f"a new import circle: {sorted(comp)}"
    for known in KNOWN_CIRCLES:
        assert any(known <= comp for comp in found), "a known circle got smaller or went: update KNOWN_CIRCLES to " \
                                                     f"{[sorted(c) for c in found]}"


def test_no_new_long_module():
    long = {name for name, path in modules().items() if len(path.read_text().splitlines()) > MAX_LINES}
    assert not long - LONG_MODULES, f"over {MAX_LINES} lines: {sorted(long - LONG_MODULES)}; split by concept"
    shorter = sorted(LONG_MODULES - long)
    assert not shorter, f"now under {MAX_LINES} lines: {shorter}; remove them from LONG_MODULES"


def test_every_profile_uses_the_corpus_name_library_code_defaults_to():
    from monosemantic import profiles
    from monosemantic.config import CORPUS_NAME, PROFILES

    assert {profiles.get(p).corpus.name for p in PROFILES} == {CORPUS_NAME}


def test_every_relative_import_names_a_module_or_a_name_it_defines():
    """A module moved into a package keeps ``from . import store`` inside its functions: that then names a
    sibling that does not exist and fails only when the function runs. Read every relative import."""
    mods = modules()

    def names_of(module: str) -> set[str]:
        tree = ast.parse(mods[module].read_text())
        out: set[str] = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                out.add(node.name)
            elif isinstance(node, ast.Assign):
                out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                out.add(node.target.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                out |= {(a.asname or a.name).split(".")[0] for a in node.names}
        return out

    bad = []
    for name, path in mods.items():
        package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            base = package[:len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else [])) or "__init__"
            if target not in mods:
                bad.append(f"{path.name}:{node.lineno} from {'.' * node.level}{node.module or ''}")
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target != "__init__" else alias.name
                if sub not in mods and alias.name not in names_of(target):
                    bad.append(f"{path.name}:{node.lineno} {alias.name} from {target}")
    assert not bad, f"relative imports that name nothing: {bad}"
