"""The README's headline numbers come from the cache and stay in step with it."""

from __future__ import annotations

import pytest

from monosemantic import readme
from monosemantic.config import UserError, project_root


def test_readme_headline_matches_the_cache():
    text = (project_root() / "README.md").read_text()
    assert readme.render(text) == text, "README.md is stale: run `monosemantic readme`"


def test_headline_says_what_is_missing(tmp_cache):
    block = readme.headline_markdown()
    assert "Not yet in the cache: corpus/minipile, lm/model" in block


def test_readme_without_markers_is_refused():
    with pytest.raises(UserError, match="no <!-- headline:start -->"):
        readme.render("# a README without the block\n")


def test_readme_states_each_profiles_wall_time_from_the_manifests():
    text = (project_root() / "README.md").read_text()
    block = text.split(readme.WALLTIME_START)[1].split(readme.WALLTIME_END)[0]
    assert [line.split("`")[1] for line in block.splitlines() if line.startswith("- ")] == list(readme.PROFILES)
    assert "about an hour" not in text
    with pytest.raises(UserError, match="no <!-- walltime:start -->"):
        readme.render(f"{readme.START}\n{readme.END}\n")


def test_the_readmes_python_example_runs_and_prints_what_it_says(capsys):
    text = (project_root() / "README.md").read_text()
    block = text.split("<!-- example:start -->")[1].split("<!-- example:end -->")[0]
    code = block.split("```python")[1].split("```")[0]
    exec(compile(code, "README example", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    said = [line.split("# ")[-1].strip() for line in code.splitlines() if line.startswith("print(")]
    assert printed == said
