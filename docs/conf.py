"""Sphinx configuration of the lca_ext documentation (built by scripts/docs.sh)."""
import os
import re
import sys

sys.path.insert(0, os.path.abspath(".."))
import lca_ext  # noqa: E402  (the built package: the API pages are read from it)

project = "lca_ext"
author = "the lca_ext developers"
copyright = "2026, the lca_ext developers"
release = version = lca_ext.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["dollarmath", "deflist"]
myst_heading_anchors = 3
exclude_patterns = ["_build", "README.md"]

# every public name documented from its docstring, in source order
autodoc_default_options = {"member-order": "bysource",
                           "undoc-members": False, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_class_signature = "separated"
autodoc_mock_imports = []

html_theme = "furo"
html_title = f"lca_ext {release}"
html_static_path = []
# the site opens from the file system: no search index server, no CDN fonts
html_copy_source = False

nitpicky = False


def _generated_pages(app):
    """Pages made from the code at build time, so they cannot go stale: the
    registered op schemas and the command line's help."""
    import contextlib
    import io

    import torch

    from lca_ext import cli

    out = os.path.join(app.srcdir, "reference", "_generated")
    os.makedirs(out, exist_ok=True)
    # torch.ops namespaces list only what was looked up: name the registered ops
    ops = ("allocate", "allocate_classes", "accumulate_", "sign_changes_")
    with open(os.path.join(out, "schemas.txt"), "w") as f:
        for name in ops:
            op = getattr(torch.ops.lca_ext, name)
            for overload in op.overloads():
                f.write(str(getattr(op, overload)._schema) + "\n")
    parser = cli._parser()
    with open(os.path.join(out, "cli.txt"), "w") as f:
        f.write(parser.format_help() + "\n")
        for action in parser._subparsers._group_actions:
            for name, sub in action.choices.items():
                f.write(f"\n$ lca-ext {name} --help\n\n{sub.format_help()}\n")


_ABS = re.compile(r"(?<!\\)\|([^|`\n]+?)\|")
# "name:   what it is" (or "name   what it is"), its continuation lines
# indented under "what": the docstrings' plain-text field lists
_NAME = r"[\w.*()/=-]*[\w)*](?:\[[^\]]*\])?(?: \[[^\]]*\])?"     # x, x[k], x [T, K]
_NAMES = rf"{_NAME}(?:, {_NAME})*"
_FIELD = re.compile(rf"^(\s*)({_NAMES}):?\s{{2,}}(\S.*)$")

_HANGING = re.compile(rf"^(\s*)({_NAMES}): (\S.*)$")


def _formulas(line: str) -> str:
    """|x| (an absolute value, readable in help()) as inline code: reST would
    read it as a substitution.  Text already inside ``...`` is left alone."""
    parts = line.split("``")
    for i in range(0, len(parts), 2):
        parts[i] = _ABS.sub(lambda m: f"``|{m.group(1)}|``", parts[i])
    return "``".join(parts)


def _field_lists(lines):
    """Plain-text field lists as reST definition lists (name, then the
    indented description), with the blank lines reST wants around them."""
    out, i, in_literal = [], 0, None
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        if in_literal is not None and line.strip() and indent <= in_literal:
            in_literal = None
        if line.rstrip().endswith("::"):
            in_literal = indent
        m = None
        if in_literal is None and not line.lstrip().startswith(("*", "-", ">>>")):
            m = _FIELD.match(line)
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if not m and len(nxt) - len(nxt.lstrip()) > indent and nxt.strip():
                m = _HANGING.match(line)   # "name: what", continued below, indented
        if not m:
            out.append(line)
            i += 1
            continue
        lead, name, desc = m.groups()
        col = line.index(desc, len(lead) + len(name))
        body = [desc]
        i += 1
        while i < len(lines) and lines[i].strip() and (
                len(lines[i]) - len(lines[i].lstrip())) > len(lead):
            body.append(lines[i].strip())
            i += 1
        if out and out[-1].strip():
            out.append("")
        out.append(f"{lead}{name}")
        out.extend(f"{lead}    {b}" for b in body)
        if i < len(lines) and lines[i].strip() and not _FIELD.match(lines[i]):
            out.append("")
    return out


def _process(app, what, name, obj, options, lines):
    lines[:] = _field_lists([_formulas(l) if not l.lstrip().startswith((">>>", "..."))
                             else l for l in lines])


def setup(app):
    app.connect("builder-inited", _generated_pages)
    app.connect("autodoc-process-docstring", _process)
