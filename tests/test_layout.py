"""The repo's layout never shadows an installed package.

Our top-level folders are installed as `slora.<folder>` (pyproject's package-dir table). A
folder that is also importable by its bare name shadows any distribution of that name: with
transformers 5, the PyPI package `kernels` (which transformers imports) was found as our
`kernels/` and every test that imports transformers failed.
"""
import importlib.util
import os
import json
import subprocess
import sys
import tomllib

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def our_top_level_folders() -> list[str]:
    """Every top-level folder of the repo that holds Python code (those pyproject maps, and
    any other, tests/ included)."""
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        package_dir = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    mapped = {path.split("/")[0] for path in package_dir.values()}
    with_code = {name for name in os.listdir(REPO_ROOT)
                 if os.path.isdir(os.path.join(REPO_ROOT, name)) and not name.startswith(".")
                 and any(f.endswith(".py") for f in os.listdir(os.path.join(REPO_ROOT, name)))}
    return sorted(mapped | with_code)


def bare_import_origins(names: list[str]) -> dict[str, str | None]:
    """Where `import NAME` would load each name from in this process (None: nowhere)."""
    out = {}
    for name in names:
        spec = importlib.util.find_spec(name)
        out[name] = None if spec is None else (spec.origin or str(spec.submodule_search_locations))
    return out


def inside_repo(origin: str | None) -> bool:
    return origin is not None and REPO_ROOT in origin


def test_the_layout_lists_the_folders_that_matter():
    """The folder list the guards check holds the ones that once shadowed (kernels, worker)."""
    names = our_top_level_folders()
    assert {"kernels", "worker", "models", "scheduler", "common", "tests"} <= set(names), names


def test_no_top_level_folder_is_importable_bare_in_the_test_process():
    """In the process running the tests, `import kernels` (or any other of our folder names)
    finds an installed package or nothing, never our folder."""
    shadowing = {n: o for n, o in bare_import_origins(our_top_level_folders()).items()
                 if inside_repo(o) and n != "tests"}
    assert not shadowing, (
        f"our folders are importable by their bare names: {shadowing}; the repo root is on "
        f"sys.path ({[p for p in sys.path if os.path.abspath(p or '.') == REPO_ROOT]})")


def test_no_top_level_folder_shadows_in_a_process_started_from_the_repo_root():
    """A service started the way slora starts every process (python_module_command), with the
    repo root as its working directory, finds no folder of ours by its bare name."""
    from slora.common.lifecycle import python_module_command
    names = [n for n in our_top_level_folders() if n != "tests"]
    script = ("import importlib.util, json, sys; print(json.dumps({n: (lambda s: s and "
              "(s.origin or str(s.submodule_search_locations)))(importlib.util.find_spec(n)) "
              "for n in sys.argv[1:]}))")
    interpreter = python_module_command("MODULE")[:-2]  # the same interpreter and flags
    cmd = [*interpreter, "-c", script, *names]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    origins = json.loads(proc.stdout.strip().splitlines()[-1])
    shadowing = {n: o for n, o in origins.items() if inside_repo(o)}
    assert not shadowing, f"started from the repo root, a service sees {shadowing}"


@pytest.mark.parametrize("name", ["kernels"])
def test_an_installed_distribution_of_one_of_our_names_is_the_one_imported(name):
    """Where a distribution of the same name is installed (transformers 5 pulls in
    `kernels`), a bare import loads that distribution."""
    from importlib.metadata import packages_distributions
    if name not in packages_distributions():
        pytest.skip(f"no distribution provides a top-level {name!r} here")
    spec = importlib.util.find_spec(name)
    assert spec is not None and not inside_repo(spec.origin), spec


ALLOWED_IMPORTS = {
    "common": set(),
    "kernels": set(),
    "protos": {"common", "v1"},
    "adapter_store": {"common"},
    "models": {"common", "kernels"},
    # adapter_store for the replica registry only (its Redis schema and client): a
    # scheduler registers itself, its load and the adapters it holds (scheduler/registration.py)
    "scheduler": {"common", "protos", "v1", "adapter_store"},
    "worker": {"common", "protos", "v1", "models", "kernels", "adapter_store"},
    "engine": {"common", "protos", "scheduler", "worker", "adapter_store"},
}
"""DESIGN.md's Layout: which of our folders each folder may import (itself aside). Above
all, scheduler/ and worker/ never import engine/, and models/ nothing above kernels/.
scheduler/ takes from adapter_store/ only the registry of replicas (SCHEDULER_FROM_STORE)."""
SCHEDULER_FROM_STORE = {"slora.adapter_store.replicas", "slora.adapter_store.redis_client"}
"""The Redis side a scheduler publishes its replica through: no PEFT parsing, no torch."""


def slora_imports(folder: str) -> dict[str, str]:
    """Each `slora.<top>` folder this folder's code imports -> one file that does."""
    import ast

    found = {}
    for dirpath, _, files in os.walk(os.path.join(REPO_ROOT, folder)):
        for name in files:
            if not name.endswith(".py") or name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            path = os.path.join(dirpath, name)
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                modules = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                           else [a.name for a in node.names] if isinstance(node, ast.Import)
                           else [])
                for module in modules:
                    parts = module.split(".")
                    if parts[0] == "slora" and len(parts) > 1 and parts[1] != folder:
                        found.setdefault(parts[1], os.path.relpath(path, REPO_ROOT))
    return found


def test_the_scheduler_takes_only_the_replica_registry_from_the_adapter_store():
    """scheduler/ imports no adapter_store module but the registry of replicas and its Redis
    client, and the scheduler process does not import torch for them."""
    import ast

    found = set()
    for dirpath, _, files in os.walk(os.path.join(REPO_ROOT, "scheduler")):
        for name in (f for f in files if f.endswith(".py")):
            with open(os.path.join(dirpath, name)) as f:
                for node in ast.walk(ast.parse(f.read())):
                    if isinstance(node, ast.ImportFrom) and node.module and \
                            node.module.startswith("slora.adapter_store"):
                        found.add(node.module)
    assert found and found <= SCHEDULER_FROM_STORE, found - SCHEDULER_FROM_STORE
    proc = subprocess.run([sys.executable, "-P", "-c",
                           "import sys, slora.scheduler.server; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]


@pytest.mark.parametrize("folder", list(ALLOWED_IMPORTS))
def test_imports_flow_one_way(folder):
    """A folder imports only the folders below it in DESIGN.md's Layout."""
    wrong = {top: path for top, path in slora_imports(folder).items()
             if top not in ALLOWED_IMPORTS[folder]}
    assert not wrong, f"{folder}/ imports {wrong} (allowed: {sorted(ALLOWED_IMPORTS[folder])})"
