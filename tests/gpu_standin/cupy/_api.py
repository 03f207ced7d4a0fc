"""What real CuPy 14.2 exports: the stand-in's whitelist of names and signatures.

``_cupy_14.2_api.json`` was dumped from the CuPy 14.2 wheel (a copy of
``shared/data/cupy/cupy_14.2_api.json``): for the modules ``cupy`` and ``cupy.fft`` each
public name with its kind and, where Python could read one, its signature; for ``ndarray``
the list of its attributes. The stand-in defines no public name that is not listed here.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

API_FILE = Path(__file__).with_name("_cupy_14.2_api.json")


@cache
def api() -> dict[str, Any]:
    """The whole dump: ``{"cupy": {...}, "cupy.fft": {...}, "ndarray": [...]}``."""
    return json.loads(API_FILE.read_text())


def members(module: str) -> dict[str, dict[str, Any]]:
    """``{name: {"kind": ..., "sig": ...}}`` of ``module`` ("cupy" or "cupy.fft")."""
    return api()[module]


def ndarray_attributes() -> frozenset[str]:
    """Attribute names of real ``cupy.ndarray``."""
    return frozenset(api()["ndarray"])


@cache
def signature(module: str, name: str) -> inspect.Signature | None:
    """The signature real CuPy has for ``module.name``, or None when the dump has none."""
    entry = members(module).get(name)
    return parse_signature(entry["sig"]) if entry and entry["sig"] else None


def parse_signature(text: str) -> inspect.Signature:
    """An :class:`inspect.Signature` from its text, e.g. ``"(a, axis=None, *, copy=None)"``.

    Defaults that are not literals (``<class 'float'>``) become None: only the parameter
    names and kinds matter for binding calls.
    """
    text = re.sub(r"<[^<>]*>", "None", text)
    args = ast.parse(f"def f{text}: pass").body[0].args  # type: ignore[attr-defined]
    p = inspect.Parameter

    def default(node: ast.expr | None) -> Any:
        if node is None:
            return p.empty
        try:
            return ast.literal_eval(node)
        except ValueError:
            return None

    params = []
    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for i, (arg, d) in enumerate(zip(positional, defaults, strict=True)):
        kind = p.POSITIONAL_ONLY if i < len(args.posonlyargs) else p.POSITIONAL_OR_KEYWORD
        params.append(p(arg.arg, kind, default=default(d)))
    if args.vararg:
        params.append(p(args.vararg.arg, p.VAR_POSITIONAL))
    for arg, d in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        params.append(p(arg.arg, p.KEYWORD_ONLY, default=default(d)))
    if args.kwarg:
        params.append(p(args.kwarg.arg, p.VAR_KEYWORD))
    return inspect.Signature(params)
