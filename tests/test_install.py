"""The conda environment, the requirements and the lock agree on every pin."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    pins = {}
    for line in lines:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(3)
    return pins


def test_environment_yml_matches_requirements_and_lock():
    required = _pins((ROOT / "requirements.in").read_text().splitlines())
    locked = _pins((ROOT / "requirements.lock").read_text().splitlines())
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_pins = _pins(pip_section)
    assert "python=3.11" in env["dependencies"]
    assert "-r requirements.lock" in pip_section
    assert conda_pins == required, "environment.yml pins differ from requirements.in"
    for name, version in required.items():
        assert locked.get(name) == version, f"{name}: requirements.in {version}, lock {locked.get(name)}"


def test_no_installed_distribution_shadows_the_test_packages():
    """No installed wheel ships a top-level ``tests`` (or ``helpers``/``conftest``) module: torchstain
    1.4.1 did, and its ``tests`` package shadowed this project's (every ``from tests…`` import broke).
    The names checked are the ones this suite imports at its top level."""
    import importlib.metadata as md

    ours = {"tests", "helpers", "conftest"}
    shadowing = sorted(
        f"{dist.metadata['Name']}: {f}"
        for dist in md.distributions()
        for f in dist.files or []
        if (len(f.parts) == 2 and f.parts[0] in ours and f.parts[1] == "__init__.py")
        or (len(f.parts) == 1 and f.suffix == ".py" and f.stem in ours)
    )
    assert not shadowing, f"installed distributions ship top-level modules named like ours: {shadowing}"
