"""One name, one thing: no two modules of ``worker`` define a public (non-underscore) top-level function or class of
the same name, so a name read in a traceback, a log line or a review points at one definition. Re-exports
(``from x import name``) are not definitions and are not counted."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# names that several modules define on purpose, each module playing the same role (a protocol of modules)
ALLOWED = {
    "main": "the entry point of each command-line module (console scripts, ``python -m``)",
    "build_parser": "the argparse parser of each command-line tool (``cancelable-eval``, ``cancelable-bundle``)",
    "add_arguments": "each ``cancelable-bundle`` subcommand module adds its own arguments (``bundletool/cli.py``)",
}


def public_definitions(root: Path = REPO) -> dict[str, list[str]]:
    """Public top-level function and class name -> the modules of ``worker`` that define it."""
    out: dict[str, list[str]] = defaultdict(list)
    for path in sorted(root.glob("worker/**/*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and not node.name.startswith(
                "_"
            ):
                out[node.name].append(module)
    return dict(out)


def test_no_two_modules_define_the_same_public_name() -> None:
    defs = public_definitions()
    clashes = {name: mods for name, mods in defs.items() if len(mods) > 1 and name not in ALLOWED}
    assert not clashes, "public names defined in more than one module (rename one side):\n" + "\n".join(
        f"{name}: {', '.join(mods)}" for name, mods in sorted(clashes.items())
    )


def test_the_allow_list_holds_only_names_still_shared() -> None:
    defs = public_definitions()
    stale = sorted(name for name in ALLOWED if len(defs.get(name, [])) < 2)
    assert not stale, f"allow-listed names no longer defined twice (remove them from ALLOWED): {stale}"


def test_the_check_sees_a_clash(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "worker" / name).mkdir(parents=True)
        (tmp_path / "worker" / name / "mod.py").write_text("from x import Shared\n\n\nclass Thing:\n    pass\n")
    (tmp_path / "worker" / "c.py").write_text("def _private():\n    pass\n\n\ndef Thing():\n    pass\n")
    defs = public_definitions(tmp_path)
    assert defs == {"Thing": ["worker.a.mod", "worker.b.mod", "worker.c"]}
