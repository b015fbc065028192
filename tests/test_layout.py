"""The house's shape, as a newcomer meets it: a few leaves and subpackages by role, modules a reader can
take in at once, each file name written once, package ``__init__`` files that import nothing, torch-free
tables for --help, and a README that is a front page with docs/ behind it."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from featinv import config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "featinv"
MAX_MODULE_LINES = 350
NAMED_FILES = {name: getattr(config, name) for name in ("WEIGHTS_FILE", "RUN_CONFIG", "MANIFEST", "EVAL_DIR", "DEMO_OUT")}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_top_level_is_leaves_and_subpackages_by_role():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert len(top) <= 12, top
    assert len(packages) >= 6, packages
    assert {"nets", "diffusion", "training", "jobs", "checkpoint", "demo", "analysis", "commands"} <= set(packages)


def test_no_module_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def string_literals(path: Path):
    """(line, value) of every string constant in a module, docstrings excluded (prose may name a file)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_each_file_name_is_written_once():
    """The weights, run config, manifest, eval folder and demo folder names live in featinv.config alone."""
    found = [f"{p.relative_to(ROOT)}:{line} {value!r}" for p in modules() if p != PACKAGE / "config.py"
             for line, value in string_literals(p) if value in NAMED_FILES.values()]
    assert not found, "use the constants of featinv.config: " + "; ".join(found)


def test_literal_check_sees_a_planted_name(tmp_path):
    planted = tmp_path / "m.py"
    planted.write_text('"""Writes featinv.safetensors."""\nOUT = "featinv.safetensors"\n')
    assert [v for _, v in string_literals(planted)] == ["featinv.safetensors"]


def test_package_inits_import_nothing():
    heavy = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("__init__.py")
             if any(isinstance(n, (ast.Import, ast.ImportFrom)) and not (isinstance(n, ast.ImportFrom)
                    and n.module in ("__future__", "importlib.metadata"))
                    for n in ast.walk(ast.parse(p.read_text())))]
    assert not heavy, f"package __init__ files that import: {heavy}"


def test_tables_and_help_load_without_torch():
    code = ("import sys, featinv, featinv.config, featinv.registry, featinv.cli; "
            "bad = sorted(m for m in ('torch', 'timm', 'pytorch_lightning') if m in sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_readme_is_a_front_page_with_docs_behind_it():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 220
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert len(pages) >= 4
    for page in [ROOT / "README.md", *pages]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+:", target):
                assert (page.parent / target).exists(), f"{page.name} links to a missing {target}"
    linked = set(re.findall(r"\(docs/([\w-]+\.md)", readme))
    assert {p.name for p in pages} <= linked, "docs pages the README does not link"


def test_ci_runs_the_readme_commands():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert '.venv/bin/pip install -e ".[test,app]"' in readme and '.venv/bin/pip install -q -e ".[test,app]"' in ci
    assert ".venv/bin/python -m pytest -q" in readme and ".venv/bin/python -m pytest -q" in ci
