"""One command to run the demo, one to run the tests (the Makefile), and the README and CI that use them."""

import re
import shutil
import subprocess

import pytest
from conftest import ROOT

README = (ROOT / "README.md").read_text()


def readme_block(marker: str) -> str:
    return re.search(rf"<!-- {marker} -->\n```bash\n(.*?)```", README, re.S).group(1).strip()


def test_the_readme_leads_with_the_two_commands_and_ci_runs_the_test_one():
    first = README.index("```")
    assert README[first:].startswith("```bash\nmake demo") and "make test" in README[first : first + 200]
    assert readme_block("ci: install-and-test") == "make test"  # what .ci/run runs, in a fresh .venv-ci


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_does_what_the_long_form_does(tmp_path):
    """`make -n` on a fresh checkout: a venv, torch, the project (with the test extra for `make test`), then the
    demo or ruff and pytest; the long form in the README says the same."""
    venv = tmp_path / "v"
    for target, install, run in (("demo", 'pip install -e .', "python scripts/fit.py"),
                                 ("test", 'pip install -e ".[test]"', "pytest")):
        plan = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
        steps = [f"python3 -m venv {venv}", f"{venv}/bin/pip install torch==2.13.0", f"{venv}/bin/{install}",
                 f"{venv}/bin/{run}"]
        positions = [plan.index(step) for step in steps]
        assert positions == sorted(positions), plan
    long_form = readme_block("long-form")
    for line in ("python3 -m venv .venv", "pip install torch==2.13.0", 'pip install -e ".[test]"', "pytest"):
        assert line in long_form


def test_the_readmes_map_is_the_tree():
    """Every name in "Where things live" exists, and every module, config, script, benchmark and docs page is in it."""
    block = re.search(r"## Where things live\n\n```\n(.*?)```", README, re.S).group(1)
    folders = {"src/llama_lora/": ROOT / "src" / "llama_lora", "configs/": ROOT / "configs",
               "scripts/": ROOT / "scripts", "benchmarks/": ROOT / "benchmarks", "docs/": ROOT / "docs"}
    sections: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        head = line.split()[0] if line and not line.startswith(" ") else None
        if head is not None:
            current = head
        sections[current] = sections.get(current, "") + " " + line
    # the names outside the parenthesised descriptions, after the section's own folder
    bare = {key: re.sub(r"\([^)]*\)", "", text).replace(key, "", 1) for key, text in sections.items()}
    named = {key: set(re.findall(r"([\w.]+\.(?:py|c|yaml|md|sh)|\w+/)", text)) for key, text in bare.items()}
    for key, folder in folders.items():
        assert key in sections, f"{key} is missing from the map"
        present = {p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                   if not p.name.startswith((".", "__")) and p.name != "llama_lora.egg-info"}
        listed = named[key]
        assert listed - present == set(), f"{key}: the map names {sorted(listed - present)}, which do not exist"
        assert present - listed == set(), f"{key}: {sorted(present - listed)} are not in the map"
    assert "Makefile" in sections and (ROOT / "Makefile").is_file()


def test_the_readme_says_to_use_the_venv_before_its_first_python_command():
    """After `make demo`, a bare `python scripts/...` has no torch (failed before: nothing said to activate .venv)."""
    assert README.index(". .venv/bin/activate") < README.index("python scripts/")

