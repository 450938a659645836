"""environment.yml (conda) installs what `make setup` installs: pyproject.toml's pins and the Makefile's
data-only packages."""

from __future__ import annotations

import re
import tomllib

import yaml

from monosemantic.config import project_root


def pins(requirements: list[str]) -> dict[str, str]:
    """{normalised name: version} of ``name==version`` lines."""
    out = {}
    for line in requirements:
        name, version = line.split("==")
        out[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    return out


def test_environment_yml_has_pyprojects_pins_and_the_makefiles_extra_packages():
    root = project_root()
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted = pins(project["dependencies"] + [r for extra in ("dev", "llama")
                                             for r in project["optional-dependencies"][extra]])
    env_text = (root / "environment.yml").read_text()
    env = yaml.safe_load(env_text)
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert f"python={project['requires-python'].split('>=')[1].split(',')[0]}" in conda
    assert "pip" in conda and "-e ." in pip
    assert pins([p for p in pip if "==" in p]) == wanted
    # the packages the Makefile installs with --no-deps: the same line, spelled out for conda users
    no_deps = re.compile(r"pip install --quiet --no-deps (.+)$|pip install --no-deps (.+)$", re.M)
    make_line = no_deps.findall((root / "Makefile").read_text())
    env_line = no_deps.findall(env_text)
    assert len(make_line) == 1 and len(env_line) == 1
    assert pins("".join(make_line[0]).split()) == pins("".join(env_line[0]).split())
