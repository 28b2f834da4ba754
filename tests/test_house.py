"""The shape of the house, checked on the source: layering without upward imports, no module reading another
module's private attributes, placements as registered files, defenses without per-mechanism branches."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "invdefend"
SOURCES = sorted([*PACKAGE.rglob("*.py"), *(ROOT / "integrations").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
                  *(ROOT / "examples").glob("*.py")])

#: The layers of the core, bottom first: a module may import its own layer and those below, never above.
LAYERS: dict[str, int] = {
    "_version": 0, "stats": 0, "models": 0, "data": 0, "metrics": 0, "prior": 0, "heap": 0,
    "jacobian": 1, "whitened": 1,
    "spectral": 2,
    "risk": 3, "allocation": 3, "noise": 3,
    "noise_law": 4, "conditional": 4, "cumulative": 4, "subset": 4,
    "placements": 5,
    "mechanisms": 6,  # compatibility re-exports
    "defense": 7, "monitor": 6, "invre": 6, "attacks": 6, "batch_risk": 6, "probe_reconstruction": 6,
    "audit": 8, "report": 8, "fidelity": 8, "demo": 9, "commands": 9, "cli": 10,
}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(absolute module, imported names)`` of every import in ``path`` (relative ones resolved)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.append((mod, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "invdefend" or len(parts) < 2:
        return None
    return LAYERS.get(parts[1])


def test_every_module_has_a_layer() -> None:
    """A module missing from LAYERS would escape the layering check below."""
    missing = sorted({_module_name(p) for p in PACKAGE.rglob("*.py")
                      if _layer(_module_name(p)) is None and p.name != "__init__.py"})
    assert not missing, f"add {missing} to LAYERS in tests/test_house.py"


def test_core_modules_never_import_a_higher_layer() -> None:
    bad = []
    for path in PACKAGE.rglob("*.py"):
        own = _layer(_module_name(path))
        if own is None:
            continue
        for mod, names in _imports(path):
            targets = [mod] + [f"{mod}.{n}" for n in names] if mod == "invdefend" else [mod]
            for target in targets:
                layer = _layer(target)
                if layer is not None and layer > own:
                    bad.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def _private_names_by_module() -> dict[Path, set[str]]:
    """The private attribute and function names each source file defines (``self._x = …``, ``def _x``,
    class attributes ``_x = …``)."""
    out: dict[Path, set[str]] = {}
    for path in SOURCES:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name.startswith("_"):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr.startswith("_"):
                names.add(node.attr)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names |= {t.id for t in targets if isinstance(t, ast.Name) and t.id.startswith("_")}
        out[path] = {n for n in names if not (n.startswith("__") and n.endswith("__"))}
    return out


#: Reads of a framework's private attribute whose name one of our modules happens to use too.
FRAMEWORK_PRIVATE = {("integrations/opacus.py", "_module")}  # Opacus's GradSampleModule keeps the wrapped module there


def test_no_module_reads_another_modules_private_attributes() -> None:
    """``obj._name`` is allowed only for ``self``/``cls`` or when ``_name`` belongs to the reading file itself;
    ``from our_module import _name`` is never allowed. (Private names of torch and the frameworks are theirs
    to keep stable and are not checked here.)"""
    defined = _private_names_by_module()
    ours = set().union(*defined.values())
    bad = []
    for path in SOURCES:
        own = defined[path]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue
                if node.attr in ours and node.attr not in own \
                        and (str(path.relative_to(ROOT)), node.attr) not in FRAMEWORK_PRIVATE:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} reads .{node.attr}")
        for mod, names in _imports(path):
            if mod.startswith("invdefend") or mod.startswith("integrations"):
                bad += [f"{path.relative_to(ROOT)} imports {mod}.{n}" for n in names
                        if n.startswith("_") and not n.startswith("__") and n not in own]
                if any(part.startswith("_") and not part.startswith("__") for part in mod.split(".")) \
                        and not mod.startswith(_module_name(path).rsplit(".", 1)[0]):
                    bad.append(f"{path.relative_to(ROOT)} imports the private module {mod}")
    assert not bad, "private reads across modules:\n" + "\n".join(bad)


def test_defenses_have_no_per_mechanism_branches() -> None:
    """The pipelines branch on what a placement says about itself, never on its name."""
    hits = [f"{p.relative_to(ROOT)}:{i + 1}" for p in (PACKAGE / "defense").glob("*.py")
            for i, line in enumerate(p.read_text().splitlines()) if re.search(r"mechanism\s*[!=]=", line)]
    assert not hits, hits


def test_every_registered_placement_lives_in_its_own_file() -> None:
    from invdefend import placements

    files = {}
    for name in placements.available():
        cls = placements.get_placement(name)
        files.setdefault(Path(__import__("inspect").getfile(cls)).name, []).append(name)
    assert all(len(v) == 1 for v in files.values()), files
    assert set(placements.available()) >= {"spectral", "band_pass", "isotropic", "monitor"}


def test_a_new_placement_is_one_class_and_its_registration(tiny_problem) -> None:
    """A toy placement — all its energy on each probe's *strongest* direction — registered in this file
    alone, runs in GradientDefense by name, with a floor and in target mode, and its law is public."""
    from invdefend import GradientDefense, NoiseCovariance
    from invdefend.placements import NoisePlan, Placement, PlanContext, available, register, unregister

    name = "toy_top1"
    assert name not in available()

    @register(name)
    @dataclass(frozen=True, repr=False)
    class TopOne(Placement):
        budget: float | torch.Tensor = 0.05

        def plan(self, ctx: PlanContext, prior: NoisePlan | None = None) -> NoisePlan:
            prior = prior if prior is not None else ctx.nothing()
            tau = torch.zeros_like(ctx.singular_values)
            tau[:, 0] = ctx.scale * self.budget * ctx.energy / ctx.shares
            return prior.add_shaped(tau)

        def with_budget(self, budget: float | torch.Tensor) -> "TopOne":
            return TopOne(budget)

    try:
        model, loss, x, y = tiny_problem
        defense = GradientDefense(model, loss, mechanism=name, budget=0.3, floor=0.01, k=4, probes=1, seed=0,
                                  capture=False)
        defense.capture(x, y)
        model.zero_grad()
        loss(model(x), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
        record = defense.protect()
        assert record.mechanism == name and not record.fallback
        delta = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) - g
        u1 = defense.spectrum.left_vectors[0, :, 0]
        law = defense.noise_law()
        assert isinstance(law, NoiseCovariance)
        G = float(g @ g)
        # All of the shaped energy is on u1, which carries B² per-sample scaling divided back out: 0.3·‖ḡ‖².
        assert float(law.tau.sum()) == pytest.approx(0.3 * G, rel=1e-9)
        assert float(law.tau[0]) == pytest.approx(0.3 * G, rel=1e-9)
        assert law.sigma2_iso == pytest.approx(0.01 * G / g.numel(), rel=1e-9)
        along = float(delta.double() @ u1.double()) ** 2
        assert along > 0 and record.budget == pytest.approx(0.31, rel=1e-9)
        # target mode wraps it by name too
        target = GradientDefense(model, loss, mechanism=name, target_psnr=30.0, k=4, probes=1, seed=0, capture=False)
        target.capture(x, y)
        assert target.protect().target_reached is not None
    finally:  # the registry is process-wide: leave it as the other tests expect it
        unregister(name)
    assert name not in available()
    with pytest.raises(ValueError, match="library's own"):
        unregister("isotropic")


def test_a_placement_object_is_checked_against_the_release_kind() -> None:
    from invdefend import EmbeddingDefense
    from invdefend.models import MLP
    from invdefend.placements import BandPass

    bottom = MLP(4, hidden=(), out_features=3, activation="tanh").double()
    with pytest.raises(ValueError, match="supports gradient releases, not embedding"):
        EmbeddingDefense(bottom, placement=BandPass(budget=0.1))
    with pytest.raises(TypeError, match="placement must be"):
        EmbeddingDefense(bottom, placement="band_pass")


@pytest.fixture
def tiny_problem():
    from tiny_problems import make_problem

    return make_problem(seed=2, batch=3)


def test_setup_cfg_lists_every_package_of_the_library() -> None:
    """A regular (non-editable) install ships only the packages setup.cfg lists: a package missing there
    imports from a source checkout but breaks ``import invdefend`` from a wheel."""
    import configparser

    root = Path(__file__).resolve().parents[1]
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    listed = {line.strip() for line in cfg["options"]["packages"].splitlines() if line.strip()}
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "invdefend").rglob("__init__.py")}
    assert found - listed == set(), f"add {sorted(found - listed)} to [options] packages in setup.cfg"
