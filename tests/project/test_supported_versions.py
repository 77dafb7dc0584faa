"""The supported-version policy: setup.py states a range for each key dependency, CI's oldest tier pins exactly the
lower bounds, and what is installed lies inside the ranges."""

import ast
import importlib.metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

KEY_DEPENDENCIES = ("torch", "transformers", "peft", "accelerate", "datasets", "huggingface_hub")


def declared() -> dict[str, Requirement]:
    """Every requirement in setup.py (install_requires and the extras), by canonical name."""
    tree = ast.parse((REPO / "setup.py").read_text())
    (call,) = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"]
    keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    strings = keywords["install_requires"] + [r for extra in keywords["extras_require"].values() for r in extra]
    return {canonicalize_name(Requirement(s).name): Requirement(s) for s in strings}


def lower_bound(requirement: Requirement) -> str | None:
    bounds = [spec.version for spec in requirement.specifier if spec.operator == ">="]
    return bounds[0] if len(bounds) == 1 else None


def test_each_key_dependency_has_a_range():
    requirements = declared()
    for name in KEY_DEPENDENCIES:
        requirement = requirements[canonicalize_name(name)]
        operators = {spec.operator for spec in requirement.specifier}
        assert operators == {">=", "<"}, f"{requirement}: state both the oldest supported version and the next major"


def test_oldest_tier_pins_exactly_the_lower_bounds():
    requirements = declared()
    pins = {}
    for line in (REPO / ".ci" / "oldest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pin = Requirement(line)
            (spec,) = pin.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(pin.name)] = spec.version
    assert {canonicalize_name(n) for n in KEY_DEPENDENCIES} <= set(pins)
    for name, version in pins.items():
        assert name in requirements, f".ci/oldest.txt pins {name}, which setup.py does not require"
        bound = lower_bound(requirements[name])
        assert bound and Version(bound) == Version(version), f"{requirements[name]} but .ci/oldest.txt pins {version}"


def test_installed_versions_are_inside_the_declared_ranges():
    for name, requirement in declared().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an extra that is not installed
        # A local build tag (torch's "+cpu") is the same release.
        assert requirement.specifier.contains(installed.split("+")[0], prereleases=True), f"{name} {installed}: {requirement}"
