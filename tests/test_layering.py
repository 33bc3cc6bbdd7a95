"""Which lrft module may import which (docs/architecture.md): the adapters are the bottom layer, importing
nothing of lrft beyond themselves and lrft.errors, so that any command can build a layer without the model
loader, data or training; and no two modules import each other, not even inside a function (such an import
only hides the cycle until the function runs).

Imports are read from the source (every ``import`` statement, at the top or in a function), so an import that
only runs on some path counts too; the adapters are also imported in a fresh interpreter, which sees an
import done through ``importlib``."""

import ast
import json
import subprocess
import sys
from pathlib import Path

from lrft.adapters import ADAPTERS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lrft"
# what lrft.adapters.* may import from lrft
ADAPTERS_MAY_IMPORT = ("lrft.adapters", "lrft.errors")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported_modules(name: str) -> set[str]:
    """The lrft modules ``name`` imports anywhere in its source (``from .x import y`` names module x.y when
    that is a module, else x)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: imported_modules(name) for name in MODULES}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for module in GRAPH[todo.pop()] - seen:
            seen.add(module)
            todo.append(module)
    return seen


def within(module: str, allowed) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def test_the_graph_is_read():
    """A reader that found nothing would pass everything below."""
    assert len(MODULES) > 25 and {"lrft.adapters.base", "lrft.adapters.lora"} <= GRAPH["lrft.adapters.dora"]
    assert {"lrft.adapters", "lrft.adapters.base", "lrft.peft_format", "lrft.model"} <= GRAPH["lrft.adapter_folder"]


def test_adapters_import_nothing_above_them():
    adapters = [name for name in MODULES if within(name, ["lrft.adapters"])]
    assert len(adapters) >= len(ADAPTERS) + 2  # every type, the registry and base.py
    upward = {name: sorted(m for m in GRAPH[name] if not within(m, ADAPTERS_MAY_IMPORT)) for name in adapters}
    assert not {name: found for name, found in upward.items() if found}


def test_adapter_folder_and_peft_format_are_no_cycle():
    assert "lrft.adapter_folder" not in reachable("lrft.peft_format")
    assert "lrft.peft_format" not in reachable("lrft.peft_format")
    assert "lrft.adapter_folder" not in reachable("lrft.adapter_folder")


def test_registered_adapters_load_no_other_lrft_module():
    """Every registered type imported in a fresh interpreter, through the registry as lrft does."""
    code = (
        "import json, sys\nfrom lrft.adapters import ADAPTERS, get_adapter\n"
        "[get_adapter(kind) for kind in ADAPTERS]\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'lrft' or m.startswith('lrft.'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert set(ADAPTERS.values()) <= set(loaded)
    assert [m for m in loaded if m != "lrft" and not within(m, ADAPTERS_MAY_IMPORT)] == []
