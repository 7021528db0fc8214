"""Every Python snippet of the README and of the docs runs as written, in seconds.

The README's ```python blocks and the docs' ``.. code-block:: python`` blocks are
executed one by one, each in a fresh namespace, in a temporary folder (issue 8: the
README's snippet took 4 minutes and ended in ``NameError: my_model``)."""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def _rst_blocks(path: Path) -> list[str]:
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == ".. code-block:: python":
            i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                body.append(lines[i])
                i += 1
            blocks.append(textwrap.dedent("\n".join(body)))
        else:
            i += 1
    return blocks


SNIPPETS = [(f"README.md[{i}]", code) for i, code in enumerate(_readme_blocks(ROOT / "README.md"))]
for rst in sorted((ROOT / "docs").rglob("*.rst")):
    for i, code in enumerate(_rst_blocks(rst)):
        SNIPPETS.append((f"{rst.relative_to(ROOT)}[{i}]", code))


def test_the_readme_has_a_python_snippet():
    assert any(name.startswith("README") for name, _ in SNIPPETS)


@pytest.mark.parametrize("name,code", SNIPPETS, ids=[name for name, _ in SNIPPETS])
def test_snippet_runs_as_written(name, code, tmp_path, monkeypatch):
    from pyro_genext.data import DatasetNotFoundError
    from pyro_genext.engine import kinds, unregister

    monkeypatch.chdir(tmp_path)
    known = set(kinds())
    start = time.process_time()
    try:
        exec(compile(code, name, "exec"), {"__name__": "__snippet__"})
    except DatasetNotFoundError as e:  # Fashion-MNIST is not on every machine
        pytest.skip(f"{name} needs data that is not installed: {str(e).splitlines()[0]}")
    finally:
        for added in set(kinds()) - known:  # a snippet that registers a kind
            unregister(added)
    took = time.process_time() - start
    assert took < 20, f"{name} took {took:.1f} s"


def test_the_tutorials_readme_lists_every_tutorial():
    """tutorials/README.md is where a newcomer starts: it names every script (it listed 3 of 6)."""
    listed = (ROOT / "tutorials" / "README.md").read_text()
    scripts = sorted(p.name for p in (ROOT / "tutorials").glob("*.py") if not p.name.startswith("_"))
    assert [s for s in scripts if f"`{s}`" not in listed] == []


def test_the_readme_snippets_choose_their_thread_count():
    """Run as written, a README snippet left torch at its default (all cores); issue 17
    reported its 100 VAE steps at 11.0 s on two threads against 5.0 s on one. Each snippet
    sets one thread."""
    blocks = _readme_blocks(ROOT / "README.md")
    assert blocks and all("torch.set_num_threads(1)" in code for code in blocks)



def _documented_objects() -> list[tuple[str, object]]:
    """(where, object) for every top-level object the docs' autodoc directives document:
    ``autoclass``/``autofunction``/``autodata`` their target; ``automodule`` nothing with
    ``:no-members:``, else its ``:members:`` list, or its module's ``__all__``. As Sphinx
    does it: while conf.py's ``autodoc_default_options`` turns ``members`` on (``True``),
    a ``:members:`` list in a directive is replaced by that default, so the whole
    ``__all__`` is documented whatever the list says."""
    import importlib
    import runpy

    members_by_default = runpy.run_path(str(ROOT / "docs" / "conf.py")).get(
        "autodoc_default_options", {}).get("members")

    def resolve(path: str) -> object:
        module, _, name = path.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except ModuleNotFoundError:  # a nested attribute (Class.method)
            return getattr(resolve(module), name)

    found = []
    for rst in sorted((ROOT / "docs").rglob("*.rst")):
        lines = rst.read_text().splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"\.\. auto(module|class|function|data|exception):: (\S+)", line)
            if not m:
                continue
            options, j = {}, i + 1
            while j < len(lines) and lines[j].startswith("   :"):
                key, _, value = lines[j].strip()[1:].partition(":")
                while j + 1 < len(lines) and lines[j + 1].startswith("      "):  # continued
                    j += 1
                    value += " " + lines[j].strip()
                options[key] = value.strip()
                j += 1
            where = f"{rst.relative_to(ROOT)}:{i + 1}"
            if m.group(1) != "module":
                found.append((where, resolve(m.group(2))))
            elif "no-members" not in options and ("members" in options or members_by_default):
                module = importlib.import_module(m.group(2))
                listed = options.get("members") if members_by_default is not True else None
                names = ([n.strip() for n in listed.split(",")] if listed
                         else list(getattr(module, "__all__", [])))
                found += [(where, getattr(module, n)) for n in names if n]
    return found


def test_no_model_is_documented_twice():
    """FlowDensity was documented twice (issue 23): by an ``automodule`` of
    ``pyro_genext.models.density``, which documents its ``__all__``, and by the
    ``autoclass`` beside it. Each object of ``pyro_genext.models`` once."""
    import pyro_genext.models

    ours = {id(getattr(pyro_genext.models, n)) for n in pyro_genext.models.__all__}
    seen: dict[int, str] = {}
    twice = []
    for where, obj in _documented_objects():
        if id(obj) in ours and id(obj) in seen:
            twice.append(f"{getattr(obj, '__qualname__', obj)}: {seen[id(obj)]} and {where}")
        seen.setdefault(id(obj), where)
    assert len(seen) > 100 and not twice, twice
