"""Rules' code inputs come from the imports of their scripts, and cannot drift from them."""

import re

import pytest

from kidney_seg.code_inputs import (
    imported_modules,
    missing_code,
    module_closure,
    script_code,
    training_code,
    workflow_script_code,
)
from tests.conftest import REPO

RULE = re.compile(r"^\s*(?:rule|checkpoint)\s+(\w+):", re.M)
SCRIPT = re.compile(r'script:\s*\n\s*"\.\./workflow_scripts/(\w+)\.py"')
CODE = re.compile(r"^\s*code=(.+),\s*$", re.M)
#: The rules that fetch KiTS files: the only ones without code inputs (the phantom's generate_phantom has them).
DOWNLOADS = {"download_image", "download_label"}


def code_of(script: str) -> list[str]:
    """common.smk's helper, on this checkout."""
    return workflow_script_code(REPO, script)


def rules_with_scripts() -> dict[str, tuple[str, str]]:
    """rule name -> (script name, the code= expression) for every rule in rules/*.smk that runs a script."""
    found = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        text = smk.read_text()
        starts = [(m.start(), m.group(1)) for m in RULE.finditer(text)]
        for (start, name), end in zip(starts, [s for s, _ in starts[1:]] + [len(text)]):
            block = text[start:end]
            script = SCRIPT.search(block)
            if script:
                code = CODE.search(block)
                found[name] = (script.group(1), code.group(1) if code else "[]")
    return found


def declared_code(expression: str) -> list[str]:
    """Evaluate a rule's code= expression."""
    return eval(expression, {"code_of": code_of})  # noqa: S307


def test_every_rule_declares_every_module_its_script_runs():
    rules = rules_with_scripts()
    assert {"plan", "preprocess", "train", "predict", "report", "split", "fingerprint", "evaluate_case"} <= set(rules)
    assert {script for script, _ in rules.values()} == {p.stem for p in (REPO / "workflow_scripts").glob("*.py")}
    for rule, (script, expression) in rules.items():
        if rule in DOWNLOADS:  # a file from the network does not change with our code: editing it reruns nothing
            assert expression == "[]", f"rule {rule} would download again after a code edit"
            continue
        missing = missing_code(REPO / "workflow_scripts" / f"{script}.py", declared_code(expression))
        assert not missing, f"rule {rule}: code inputs lack {missing}"


def test_a_hand_written_list_that_misses_a_module_fails():
    old_predict = [
        str(REPO / "kidney_seg" / m)
        for m in (
            "__init__.py",
            "atomic.py",
            "volume.py",
            "errors.py",
            "inference.py",
            "preprocessing.py",
            "losses.py",
            "determinism.py",
        )
    ]
    missing = missing_code(REPO / "workflow_scripts" / "predict.py", old_predict)
    assert "kidney_seg/model.py" in missing and "kidney_seg/plan.py" in missing


def _package(root, files: dict[str, str]):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_imports_are_followed_transitively_with_their_packages(tmp_path):
    _package(
        tmp_path,
        {
            "kidney_seg/__init__.py": "",
            "kidney_seg/a.py": (
                "from typing import TYPE_CHECKING\nfrom . import b\n"
                "if TYPE_CHECKING:\n    from kidney_seg import typing_only\n"
            ),
            "kidney_seg/b.py": "def f():\n    from kidney_seg.sub.c import g  # lazy: runs when f does\n",
            "kidney_seg/typing_only.py": "",
            "kidney_seg/sub/__init__.py": "",
            "kidney_seg/sub/c.py": "import numpy\nfrom ..d import x\n",
            "kidney_seg/d.py": "x = 1\n",
            "kidney_seg/unused.py": "",
            "script.py": "import kidney_seg.a\n",
        },
    )
    assert imported_modules(tmp_path / "kidney_seg" / "sub" / "c.py", tmp_path) == {"kidney_seg.d"}
    names = [str(p.relative_to(tmp_path)) for p in module_closure([tmp_path / "script.py"], tmp_path)]
    assert names == [
        "kidney_seg/__init__.py",
        "kidney_seg/a.py",
        "kidney_seg/b.py",
        "kidney_seg/d.py",
        "kidney_seg/sub/__init__.py",
        "kidney_seg/sub/c.py",
    ]


def test_training_code_is_below_the_report_layer():
    names = {str(p.relative_to(REPO)) for p in training_code()}
    assert {
        "kidney_seg/training.py",
        "kidney_seg/checkpoint.py",
        "kidney_seg/curves.py",
        "kidney_seg/model.py",
    } <= names
    assert not any(n.startswith("kidney_seg/report") for n in names)
    assert set(map(str, script_code(REPO / "workflow_scripts" / "train.py"))) >= {
        str(REPO / "kidney_seg" / "training.py")
    }


def test_an_unknown_script_is_an_error():
    with pytest.raises(FileNotFoundError, match="no workflow script"):
        code_of("no_such_script")


def test_imports_in_every_kind_of_block_are_found(tmp_path):
    blocks = (
        "class A:\n    def m(self):\n        import kidney_seg.k1\n"
        "try:\n    import kidney_seg.k2\nexcept ImportError:\n    import kidney_seg.k3\n"
        "else:\n    import kidney_seg.k4\nfinally:\n    import kidney_seg.k5\n"
        "with open('x') as f:\n    for _ in f:\n        while True:\n            import kidney_seg.k6\n"
        "        else:\n            import kidney_seg.k7\n"
        "match 1:\n    case 1:\n        import kidney_seg.k8\n"
        "if False:\n    pass\nelif True:\n    from kidney_seg import k9\n"
        "async def g():\n    async with x:\n        import kidney_seg.k10\n"
    )
    modules = {f"kidney_seg/k{i}.py": "" for i in range(1, 11)}
    _package(tmp_path, {"kidney_seg/__init__.py": "", **modules, "script.py": blocks})
    found = imported_modules(tmp_path / "script.py", tmp_path)
    assert found == {"kidney_seg", *(f"kidney_seg.k{i}" for i in range(1, 11))}  # the package: `from kidney_seg`
