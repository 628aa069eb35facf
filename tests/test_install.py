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
