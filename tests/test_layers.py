"""The import contract: every layer imports only the layers below it, over the whole tree.

    ui/  ->  studio/app/  ->  trainers/, merging/  ->  studio/generation/, studio/demo/  ->  studio/core/

Parts on one floor do not import each other (trainers and merging, generation and the demo world). Every
import counts, at the top of a module or inside a function. New files are covered the day they are added:
the parts are folders, not lists of files.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# (folder, floor): a module belongs to the longest folder that holds it
PARTS = {
    "studio/core": 1,
    "studio/generation": 2,
    "studio/demo": 2,
    "trainers": 3,
    "merging": 3,
    "studio/app": 4,
    "ui": 5,
}
TOP_PACKAGES = ("studio", "trainers", "merging", "ui")
# The one import that runs up, and why: `lora-studio ui` is a command of the app that starts the page.
ALLOWED = {("studio/app/commands/ui.py", "ui.app")}


def part_of_file(path: Path) -> str | None:
    rel = path.relative_to(ROOT).as_posix()
    found = [p for p in PARTS if rel.startswith(p + "/")]
    return max(found, key=len) if found else None


def part_of_module(name: str) -> str | None:
    rel = name.replace(".", "/")
    found = [p for p in PARTS if rel == p or rel.startswith(p + "/")]
    return max(found, key=len) if found else None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]  # `from pkg import module`
    return out


def allowed(path: Path, module: str) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == f and (module == m or module.startswith(m + ".")) for f, m in ALLOWED)


def source_files() -> list[Path]:
    return sorted(p for top in TOP_PACKAGES for p in (ROOT / top).rglob("*.py"))


def test_every_module_belongs_to_a_part():
    loose = [p.relative_to(ROOT).as_posix() for p in source_files() if part_of_file(p) is None]
    assert loose == ["studio/__init__.py"], "put new files in a layer's folder: " + ", ".join(loose)


def test_layers_import_only_downwards():
    broken = []
    for path in source_files():
        here = part_of_file(path)
        if here is None:
            continue
        for line, module in imported_modules(path):
            there = part_of_module(module)
            if there is None or there == here or allowed(path, module):
                continue
            if PARTS[there] >= PARTS[here]:
                broken.append(f"{path.relative_to(ROOT)}:{line} ({here}) imports {module} ({there})")
    assert not broken, "imports that run up or sideways:\n" + "\n".join(sorted(set(broken)))


def test_only_the_page_imports_gradio_and_the_page_does_no_tensor_work():
    for path in source_files():
        roots = {module.split(".")[0] for _, module in imported_modules(path)}
        in_ui = part_of_file(path) == "ui"
        assert in_ui or "gradio" not in roots, f"{path.relative_to(ROOT)} imports gradio"
        assert not (in_ui and roots & {"torch", "diffusers", "peft", "transformers"}), (
            f"{path.relative_to(ROOT)} works with tensors itself; call a service instead"
        )


def test_the_contract_catches_an_upward_import(tmp_path):
    """The checks above would fail on a core module that reached up to the app (the test is not vacuous)."""
    fake = ROOT / "studio" / "core" / "_contract_probe.py"
    fake.write_text("def f():\n    from studio.app.services import build_services\n")
    try:
        with pytest.raises(AssertionError, match="_contract_probe.py:2 .* imports studio.app.services"):
            test_layers_import_only_downwards()
    finally:
        fake.unlink()


@pytest.mark.parametrize(
    "module", ["studio.core.keys", "studio.core.blocks", "studio.core.io", "studio.core.lora_ref"]
)
def test_key_names_and_headers_need_no_torch(module):
    """Naming a key or reading a safetensors header must not import torch or diffusers (the CLI stays fast)."""
    code = (
        f"import sys, {module}; print(sorted(m for m in ('torch', 'diffusers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
