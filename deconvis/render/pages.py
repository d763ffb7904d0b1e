"""HTML pages from Jinja2 templates shipped in ``deconvis/render/templates`` (package data).

One environment for every front end (the run's report, its unit pages, the explorer), all built
on ``base.html``. Autoescaping is on for every template: file, layer and class names are
untrusted text. Values meant for a ``<script type="application/json">`` go through the
``script_json`` filter (JSON with ``<``, ``>`` and ``&`` escaped, so it cannot close the tag).
"""
from __future__ import annotations

import functools
import json
from typing import Any

import jinja2
from markupsafe import Markup, escape


def script_json(value: Any) -> Markup:
    """``value`` as compact JSON, inert inside a ``<script>`` element."""
    text = (json.dumps(value, separators=(",", ":"), ensure_ascii=False)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
    return Markup(text)


def cell(value: Any) -> Markup:
    """A table cell: numbers with 4 significant digits (right-aligned), anything else as text."""
    if isinstance(value, float):
        return Markup(f'<td class="num">{value:.4g}</td>')
    if isinstance(value, int) and not isinstance(value, bool):
        return Markup(f'<td class="num">{value}</td>')
    return Markup("<td>%s</td>") % escape(str(value))


#: names a plain dict has as attributes (``d.items`` is the method, as Jinja resolves it)
_DICT_ATTRS = frozenset(dir(dict))


class _Environment(jinja2.Environment):
    """Jinja's environment with ``d.name`` looked up as ``d[name]`` first for a plain ``dict``
    whose type has no attribute ``name``: the same value Jinja finds (it tries the attribute, which
    such a dict cannot have, then the item), without raising and catching an AttributeError on
    every field of every page (a quarter of the unit pages' time)."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute not in _DICT_ATTRS:
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The shared environment: templates from the package, autoescape on, undefined names fail."""
    env = _Environment(loader=jinja2.PackageLoader("deconvis.render", "templates"),
                       autoescape=True, undefined=jinja2.StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(script_json=script_json, cell=cell)
    return env


def render_page(template: str, **context: Any) -> str:
    """Render ``template`` (a name in ``deconvis/render/templates``) with ``context``."""
    return environment().get_template(template).render(**context)
