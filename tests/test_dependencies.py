"""setup.cfg declares every package the library and the tests import, and no test-only one
as a library dependency."""

import ast
import configparser
import importlib.metadata
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Imported by the tests only: they belong in the `test` extra, never in install_requires.
TEST_ONLY = {"chex", "pytest", "nbclient", "nbformat", "ipykernel"}


def _canonical(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _declared(section: str, key: str) -> set[str]:
  """Distribution names (canonical, without versions or extras) of one setup.cfg list."""
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  lines = [line.strip() for line in cfg[section][key].splitlines() if line.strip()]
  return {_canonical(re.split(r"[\s<>=!~\[;]", line)[0]) for line in lines}


def _imports(directory: pathlib.Path) -> dict[str, str]:
  """Top-level modules imported by the .py files under `directory` (absolute imports,
  module level or inside functions), minus the standard library and local modules,
  each with one file that imports it."""
  local = {"deepexit_jax"} | {p.stem for p in directory.glob("*.py")}
  found = {}
  for path in sorted(directory.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [node.module]
      else:
        continue
      for name in names:
        top = name.split(".")[0]
        if top not in sys.stdlib_module_names and top not in local:
          found.setdefault(top, str(path.relative_to(ROOT)))
  return found


def _undeclared(imports: dict[str, str], declared: set[str]) -> dict[str, str]:
  dists = importlib.metadata.packages_distributions()
  return {f"{module} (from {', '.join(dists.get(module, ['?']))})": where
          for module, where in imports.items()
          if not {_canonical(d) for d in dists.get(module, [module])} & declared}


def test_every_package_the_library_imports_is_an_install_requirement():
  imports = _imports(ROOT / "deepexit_jax")
  assert {"jax", "flax", "orbax", "etils", "tensorboardX"} <= set(imports)  # The scan works.
  assert _undeclared(imports, _declared("options", "install_requires")) == {}


def test_every_package_the_tests_import_is_declared():
  declared = _declared("options", "install_requires") | _declared("options.extras_require",
                                                                  "test")
  assert _undeclared(_imports(ROOT / "tests"), declared) == {}


@pytest.mark.parametrize("package", sorted(TEST_ONLY))
def test_test_only_packages_stay_out_of_the_library(package):
  assert package not in _imports(ROOT / "deepexit_jax")
  assert _canonical(package) not in _declared("options", "install_requires")
  assert _canonical(package) in _declared("options.extras_require", "test")
