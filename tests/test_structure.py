"""The shape of the code: helper.py is the map of the catdog package, the package has no import cycle, no file is
over 600 lines, and only the command-line module sees argparse."""

import ast
import importlib
import json
import subprocess
import sys

import pytest
from conftest import ROOT

import helper

MODULES = sorted(p.stem for p in (ROOT / "catdog").glob("*.py") if p.stem != "__init__")


def package_imports(module: str) -> set[str]:
    """The catdog modules that `module` imports (relative imports, at module level or inside functions)."""
    tree = ast.parse((ROOT / "catdog" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("catdog."):
            found.add(node.module.split(".")[1])
    return found


def test_the_package_has_no_import_cycle():
    graph = {m: package_imports(m) for m in MODULES}
    assert set().union(*graph.values()) <= set(MODULES)
    done, order = set(), []

    def visit(m, path):
        assert m not in path, f"import cycle: {' -> '.join([*path, m])}"
        if m not in done:
            for n in sorted(graph[m]):
                visit(n, [*path, m])
            done.add(m)
            order.append(m)

    for m in MODULES:
        visit(m, [])
    assert order[0] == "common"  # the one module that imports no other


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_on_its_own_without_tensorflow(module):
    """In a fresh process: importing any module (helper too) does no work, TensorFlow and KerasHub included."""
    code = (f"import sys; import catdog.{module}, helper; "
            "sys.exit(1 if any(m.split('.')[0] in ('tensorflow', 'keras', 'keras_hub') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_helper_re_exports_every_name_it_lists_from_the_module_it_names():
    doc_modules = [line.split()[0].removeprefix("catdog/").removesuffix(".py")
                   for line in helper.__doc__.splitlines() if line.strip().startswith("catdog/")]
    assert sorted(doc_modules) == MODULES  # every module is on the map, once
    source = ast.parse((ROOT / "helper.py").read_text())
    imported = {}
    for node in source.body:
        if isinstance(node, ast.ImportFrom):
            assert node.module.startswith("catdog.") and all(a.name != "*" for a in node.names)
            imported.update({a.name: node.module.split(".")[1] for a in node.names})
    assert list(dict.fromkeys(imported.values())) == doc_modules  # imported in the docstring's (pipeline) order
    assert sorted(helper.__all__) == sorted(imported)
    for name, module in imported.items():
        assert getattr(helper, name) is getattr(importlib.import_module(f"catdog.{module}"), name)


def test_no_file_is_over_600_lines():
    files = [p for p in ROOT.rglob("*.py") if not {".git", "demo", "data", "model"} & set(p.relative_to(ROOT).parts)]
    assert len(files) > 30
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 600}
    assert not long


def test_only_the_command_line_module_sees_argparse():
    for module in MODULES:
        text = (ROOT / "catdog" / f"{module}.py").read_text()
        if module != "cli":
            assert "argparse" not in text and "Namespace" not in text, module
            assert "args." not in text, f"catdog/{module}.py reads a parsed command line"


def test_each_module_says_what_it_owns_and_who_uses_it():
    for module in MODULES:
        doc = ast.get_docstring(ast.parse((ROOT / "catdog" / f"{module}.py").read_text()))
        assert doc and "Used by:" in doc, module


def test_the_spark_zip_holds_helper_and_the_package(tmp_path):
    """06 --spark ships helper.py and catdog/ to the workers in one zip (test_spark_trials_on_local_2 runs it)."""
    import zipfile

    from conftest import script

    class Context:
        added = []

        def addPyFile(self, path):  # noqa: N802 - Spark's name
            self.added.append(path)

    spark = type("Spark", (), {"sparkContext": Context()})()
    script("06").ship_package(spark, tmp_path)
    with zipfile.ZipFile(Context.added[0]) as z:
        names = set(z.namelist())
    assert names == {"helper.py", "catdog/__init__.py"} | {f"catdog/{m}.py" for m in MODULES}


def test_head_config_reads_the_flags_it_names():
    flags = {"optimizer": "sgd", "lr": 0.003, "epochs": 7, "seed": 5, "data_dir": "x", "verbose": False}
    config = helper.HeadConfig.of(flags)
    assert (config.optimizer, config.lr, config.epochs, config.seed, config.dropout) == ("sgd", 0.003, 7, 5, 0.5)
    assert json.loads(json.dumps(config.attrs())) == config.attrs()  # what sidecars store
