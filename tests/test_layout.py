"""The package's tree reads like its architecture (issue 18): each subpackage states its one
job in a sentence, no module reaches into a sibling subpackage's private modules or names,
and the installed package holds no model code (the models live in testbed/)."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def library_modules():
    """``(dotted name, path, is_package)`` of every installed .py module: mmfast/ as is,
    kernels/ as mmfast.kernels (setup.py's package_dir)."""
    found = []
    for top, dotted_top in (("mmfast", "mmfast"), ("kernels", "mmfast.kernels")):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            if "__pycache__" in d:
                continue
            rel = os.path.relpath(d, os.path.join(ROOT, top))
            package = dotted_top if rel == "." else dotted_top + "." + rel.replace(os.sep, ".")
            for f in sorted(files):
                if f.endswith(".py"):
                    name = package if f == "__init__.py" else package + "." + f[:-3]
                    found.append((name, os.path.join(d, f), f == "__init__.py"))
    return found


MODULES = library_modules()


def subpackage(dotted):
    """``ops`` for mmfast.ops._args, ``kernels`` for mmfast.kernels.combine; ``""`` for mmfast
    itself and its top-level modules (mmfast._C, mmfast._version)."""
    parts = dotted.split(".")
    return "" if len(parts) < 2 or parts[1].startswith("_") else parts[1]


def imported(name, path, is_package):
    """``(line, absolute dotted target)`` of each import: a module, or a name in one."""
    package = name if is_package else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for a in node.names:
                yield node.lineno, f"{base}.{a.name}"


def test_the_walk_finds_the_tree():
    names = {m for m, _, _ in MODULES}
    assert {"mmfast", "mmfast.ops", "mmfast.ops._combine", "mmfast.training", "mmfast.pytorch.reference",
            "mmfast.kernels.combine"} <= names, sorted(names)
    targets = {t for m, p, i in MODULES if m == "mmfast.ops._backends" for _, t in imported(m, p, i)}
    assert "mmfast._C" in targets, targets  # relative imports resolved


def test_no_module_imports_a_sibling_subpackages_private_parts():
    """``from ..ops import select_backend`` is fine, ``from ..ops._backends import ...`` or
    ``from ..ops import _x`` is not: what a subpackage shares, its __init__ names."""
    bad = []
    for name, path, is_package in MODULES:
        own = subpackage(name)
        for line, target in imported(name, path, is_package):
            parts = target.split(".")
            if parts[0] != "mmfast" or len(parts) < 3 or subpackage(target) in ("", own):
                continue
            if any(p.startswith("_") for p in parts[2:]):
                bad.append(f"{os.path.relpath(path, ROOT)}:{line}: {target}")
    assert not bad, "imports of a sibling subpackage's private modules or names:\n" + "\n".join(bad)


def first_paragraph(doc):
    return " ".join(doc.strip().split("\n\n")[0].split())


@pytest.mark.parametrize("name,path", [(m, p) for m, p, is_package in MODULES if is_package and m != "mmfast"])
def test_each_subpackage_states_its_job_in_one_sentence(name, path):
    doc = ast.get_docstring(ast.parse(open(path).read()))
    assert doc, f"{name} has no docstring"
    text = re.sub(r"``.*?``", "X", first_paragraph(doc))  # code spans may hold dots
    assert len(re.findall(r"[.!?](\s|$)", text)) == 1 and text.endswith("."), f"{name}: {first_paragraph(doc)!r}"


def test_no_model_code_in_the_package():
    """Models are testbed/'s (bench, examples, tests): no library class is an nn.Module."""
    bad = []
    for name, path, _ in MODULES:
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b) for b in node.bases]
                if any(b.split(".")[-1] in ("Module", "Sequential", "ModuleList", "ModuleDict") for b in bases):
                    bad.append(f"{name}.{node.name}({', '.join(bases)})")
    assert not bad, bad
    assert not any(m.rsplit(".", 1)[-1] == "models" for m, _, _ in MODULES)
