"""The package's import direction, read from the source (no JAX needed).

README.md, "Layout": imports flow one way, `config` <- `ring_kernels` <- `model` <- (`sampling`, `train`) <- `rl`
<- `cli`, and `data` / `rewards` import nothing from `model`.  Every import of ring_jax or ring_kernels, at module
level or inside a function (a function-level import is how the old sampling circle hid), must go to a strictly
lower layer of ``LAYERS``; no module may take a private name (``_x``) from another module.  A new top-level module
fails here until it is given a layer: that is the decision the test asks for.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# unit -> layer: a unit is a top-level module or subpackage of ring_jax, or the ring_kernels package
LAYERS = {
    "utils": 0,
    "config": 0,
    "rewards": 0,
    "ring_kernels": 0,
    "sharding": 1,
    "data": 1,
    "model": 2,
    "sampling": 3,
    "train": 3,
    "hf": 3,
    "hf_stream": 4,
    "rl": 4,
    "fit": 5,
    "cli": 6,
}
PACKAGES = ("ring_jax", "ring_kernels")


def _sources() -> list[tuple[str, pathlib.Path]]:
    """(dotted module name, path) of every source file of both packages."""
    out = []
    for base, top in ((ROOT, "ring_jax"), (ROOT / "kernels", "ring_kernels")):
        for f in sorted((base / top).rglob("*.py")):
            mod = ".".join(f.relative_to(base).with_suffix("").parts).removesuffix(".__init__")
            out.append((mod, f))
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "ring_kernels" or len(parts) == 1:
        return parts[0]
    return parts[1]


def _is_module(dotted: str) -> bool:
    parts = dotted.split(".")
    base = ROOT / "kernels" if parts[0] == "ring_kernels" else ROOT
    p = base.joinpath(*parts)
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _imports(path: pathlib.Path) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) for every absolute import of the two packages, skipping
    ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in PACKAGES:
                out += [(node.lineno, node.module, a.name) for a in node.names]
    return out


def test_imports_flow_down_the_layers() -> None:
    upward, unknown = [], set()
    for mod, path in _sources():
        src = _unit(mod)
        for line, target, name in _imports(path):
            # `from ring_jax import hf` names the unit in the imported name
            dst = _unit(f"{target}.{name}") if target == "ring_jax" and name else _unit(target)
            if dst == src:
                continue
            unknown.update(u for u in (src, dst) if u not in LAYERS)
            if src in LAYERS and dst in LAYERS and LAYERS[dst] >= LAYERS[src]:
                where = f"{path.relative_to(ROOT)}:{line}"
                upward.append(f"{where} ({src}, layer {LAYERS[src]}) imports {dst} (layer {LAYERS[dst]})")
    assert not unknown, f"units with no layer in LAYERS: {sorted(unknown)}"
    assert not upward, "imports that do not flow down:\n" + "\n".join(upward)


def test_no_private_names_across_modules() -> None:
    bad = []
    for mod, path in _sources():
        aliases = {}  # local name -> another module of the packages
        for line, target, name in _imports(path):
            if name is None:
                continue
            if name.startswith("_") and not name.startswith("__") and not _is_module(f"{target}.{name}"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}.{name}")
            if _is_module(f"{target}.{name}") and f"{target}.{name}" != mod:
                aliases[name] = f"{target}.{name}"
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_the_checks_have_teeth(tmp_path: pathlib.Path) -> None:
    """The two checks catch what they claim to: an upward import hidden in a function, and a private name."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from ring_jax.cli import common\n    from ring_jax.model.moe import _hidden\n")
    found = _imports(src)
    assert (2, "ring_jax.cli", "common") in found and (3, "ring_jax.model.moe", "_hidden") in found
    assert LAYERS[_unit("ring_jax.cli.common")] > LAYERS[_unit("ring_jax.model.moe")]
    guarded = tmp_path / "g.py"
    guarded.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ring_jax.cli import common\n")
    assert _imports(guarded) == []
