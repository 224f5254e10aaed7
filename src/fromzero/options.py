"""``--help`` text for recipe options, read from the config dataclasses' *source*.

``fromzero pretrain --help`` and ``fromzero finetune --help`` list every recipe key with its
default and the docstring written under it. The config classes live next to the code they
configure, in modules that import torch (seconds to load); this module reads the same facts from
the source files with :mod:`ast` (``importlib.util.find_spec`` locates a module without running
it), so help starts at once. :func:`fromzero.config.options_help` builds the same lines from the
imported classes; a test keeps the two identical for every recipe config.

It understands what our config classes use: ``@dataclass`` classes with annotated fields,
literal defaults (or module-level literal constants), ``field(default_factory=Section)`` for a
nested section, inheritance (Python's MRO order), and ``UNUSED_KEYS: ClassVar[frozenset[str]]``.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from dataclasses import dataclass
from typing import Any

_MISSING = object()


@dataclass(frozen=True)
class _Field:
    name: str
    default: Any  # a plain value, or _Section for a nested dataclass, or _MISSING
    doc: str


@dataclass(frozen=True)
class _Section:
    target: str  # "module:Class"


@functools.cache
def _module_ast(module: str) -> ast.Module:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot find module {module}")
    with open(spec.origin, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=spec.origin)


def _class_node(target: str) -> tuple[str, ast.ClassDef]:
    module, _, name = target.partition(":")
    for node in _module_ast(module).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return module, node
    raise ImportError(f"no class {name} in {module}")


def _resolve(module: str, name: str) -> str | None:
    """``module:Name`` of the class ``name`` as seen from ``module`` (defined there or imported)."""
    tree = _module_ast(module)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return f"{module}:{name}"
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return f"{node.module}:{alias.name}"
    return None


@functools.cache
def _constants(module: str) -> dict[str, Any]:
    """Module-level ``NAME = <literal>`` assignments."""
    out: dict[str, Any] = {}
    for node in _module_ast(module).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def _bases(target: str) -> list[str]:
    module, node = _class_node(target)
    resolved = [_resolve(module, base.id) for base in node.bases if isinstance(base, ast.Name)]
    return [base for base in resolved if base is not None]


def _mro(target: str) -> list[str]:
    """C3 linearisation, as Python computes a class's MRO (config classes only)."""
    sequences = [_mro(b) for b in _bases(target)] + [_bases(target)]
    result = [target]
    while any(sequences):
        for seq in sequences:
            if not seq:
                continue
            head = seq[0]
            if not any(head in s[1:] for s in sequences):
                break
        else:  # pragma: no cover - Python itself would have refused the class
            raise TypeError(f"inconsistent MRO for {target}")
        result.append(head)
        sequences = [s[1:] if s and s[0] == head else s for s in sequences]
    return result


def _default(module: str, value: ast.expr | None) -> Any:
    if value is None:
        return _MISSING
    if isinstance(value, ast.Call) and ast.unparse(value.func) in ("field", "dataclasses.field"):
        for kw in value.keywords:
            if kw.arg == "default":
                return _default(module, kw.value)
            if kw.arg == "default_factory":
                if isinstance(kw.value, ast.Lambda):  # default_factory=lambda: [64, 32, 16]
                    return _default(module, kw.value.body)
                name = ast.unparse(kw.value)
                section = _resolve(module, name)
                if section is not None:
                    return _Section(section)
                return {"list": [], "dict": {}, "set": set(), "tuple": ()}.get(name, f"{name}()")
        return _MISSING
    try:
        return ast.literal_eval(value)
    except ValueError:
        pass
    constants = _constants(module)
    if isinstance(value, ast.Name) and value.id in constants:
        return constants[value.id]
    return ast.unparse(value)


@functools.cache
def _recipe_keys(target: str) -> dict[str, str]:
    """The class's own ``RECIPE_KEYS`` literal (where its fields go in a recipe), or {}."""
    for stmt in _class_node(target)[1].body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == "RECIPE_KEYS":
            return ast.literal_eval(stmt.value)
    return {}


@functools.cache
def _own_fields(target: str) -> tuple[list[_Field], frozenset[str] | None]:
    module, node = _class_node(target)
    fields: list[_Field] = []
    unused = None
    body = node.body
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        if ast.unparse(stmt.annotation).startswith(("ClassVar", "typing.ClassVar")):
            if stmt.target.id == "UNUSED_KEYS" and isinstance(stmt.value, ast.Call) and stmt.value.args:
                unused = frozenset(ast.literal_eval(stmt.value.args[0]))
            continue
        nxt = body[i + 1] if i + 1 < len(body) else None
        doc = ""
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            doc = " ".join(nxt.value.value.split())
        fields.append(_Field(stmt.target.id, _default(module, stmt.value), doc))
    return fields, unused


def _fields(target: str) -> tuple[list[_Field], frozenset[str]]:
    """The dataclass fields of ``target`` in dataclass order (bases first; a redefinition keeps
    its place and takes the new default), each with the docstring of its nearest definition."""
    defaults: dict[str, Any] = {}
    docs: dict[str, str] = {}
    mro = _mro(target)
    for cls in reversed(mro):
        for f in _own_fields(cls)[0]:
            defaults[f.name] = f.default  # a redefinition keeps its place and takes the new default
            if f.doc:
                docs[f.name] = f.doc
    # getattr semantics: UNUSED_KEYS of the first class in the MRO that defines it
    unused = next((u for u in (_own_fields(cls)[1] for cls in mro) if u is not None), frozenset())
    return [_Field(name, default, docs.get(name, "")) for name, default in defaults.items()], unused


def config_fields(target: str) -> list[tuple[str, Any, str]]:
    """``(name, default, docstring)`` of every field of the dataclass ``target`` ("module:Class"),
    read from the source: a command's options can take their defaults and help from its config
    class without importing it."""
    return [(f.name, f.default, f.doc) for f in _fields(target)[0]]


def static_options_help(target: str, prefix: str = "") -> list[str]:
    """Lines ``--section.key (default: X)  doc`` for every leaf field of the config class
    ``target`` ("package.module:Class"), without importing its module."""
    fields, unused = _fields(target)
    # A flat (fine-tuning) config declares where its fields go in a recipe (RECIPE_KEYS along
    # the MRO; a field no class declares is a train. setting): as fromzero.config.recipe_keys.
    declared: dict[str, str] = {}
    for cls in reversed(_mro(target)):
        declared.update(_recipe_keys(cls))
    lines = []
    for f in fields:
        if f.name in unused:
            continue
        if isinstance(f.default, _Section):
            lines += static_options_help(f.default.target, prefix + f.name + ".")
            continue
        shown = "''" if f.default == "" else f.default
        key = declared.get(f.name, f"train.{f.name}") if declared else f.name
        lines.append(f"  --{prefix}{key} (default: {shown})  {f.doc}".rstrip())
    return by_section(lines) if declared else lines


# The order of a recipe's sections (config.yaml and --help list them so).
RECIPE_ORDER = ("task", "model", "data", "train", "method", "distill", "dist")


def by_section(lines: list[str]) -> list[str]:
    """Help lines ``  --section.key ...`` grouped by recipe section (model, data, train, ...), in
    field order within a section (a stable sort)."""
    order = {name: i for i, name in enumerate(RECIPE_ORDER)}

    def section(line: str) -> int:
        key = line.split()[0][2:]
        return order.get(key.partition(".")[0], len(order)) if "." in key else len(order) + 1

    return sorted(lines, key=section)
