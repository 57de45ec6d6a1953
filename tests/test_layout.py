"""The project's layout rules, checked on the source: thin stages over the library, benchmarks and tests that use
the library only, no process-global patches of torch."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def parsed(pattern: str) -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text())) for p in sorted(REPO.glob(pattern))]


@pytest.mark.parametrize("path,tree", parsed("stages/*.py"), ids=lambda v: getattr(v, "name", ""))
def test_stage_run_reads_in_at_most_60_lines(path, tree):
    runs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"]
    if path.name != "__init__.py":
        assert len(runs) == 1, f"{path.name} has no run(cfg, inputs)"
        assert runs[0].end_lineno - runs[0].lineno + 1 <= 60, f"{path.name}: run() is over 60 lines"


def imported_modules(tree: ast.Module) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "spec_from_file_location":
            out.add("<file import>")
    return out


@pytest.mark.parametrize("pattern", ["tests/*.py", "benchmarks/*.py", "pipeline/**/*.py"])
def test_only_the_library_is_imported(pattern):
    for path, tree in parsed(pattern):
        bad = {m for m in imported_modules(tree) if m == "stages" or m.startswith(("stages.", "benchmarks"))
               or m == "<file import>"}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}; import pipeline.* instead"


def test_nothing_in_pipeline_assigns_to_torch_functions():
    for path, tree in parsed("pipeline/**/*.py"):
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for t in targets:
                if isinstance(t, ast.Attribute):
                    base = ast.unparse(t.value)
                    assert base not in ("F", "torch", "torch.nn.functional", "nn.functional", "torch.nn"), (
                        f"{path.relative_to(REPO)}:{node.lineno} assigns {ast.unparse(t)}")
