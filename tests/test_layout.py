"""The package's layout: no import cycles, no TensorFlow outside the input path, public names."""
import ast
import importlib
import os
import pathlib
import subprocess
import sys

import pytest

import tiny
from conftest import REPO

PACKAGE = REPO / "patchdiff"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
  """patchdiff module -> the patchdiff modules it imports, at any depth of its code (imports
  inside functions count: they run, only later)."""
  modules = _modules()
  graph: dict[str, set[str]] = {}
  for name, path in modules.items():
    edges = graph.setdefault(name, set())
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from pkg import x`: the submodule pkg.x where there is one, else pkg itself.
        targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                   else node.module for a in node.names]
      edges.update(t for t in targets if t in modules and t != name)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as a path [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    path.pop()
    state[node] = 2
    return None

  for start in sorted(graph):
    if start not in state and (found := visit(start)):
      return found
  return None


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_in_the_package():
  graph = import_graph()
  assert {"patchdiff.train", "patchdiff.data.pipeline", "patchdiff.nn.models"} <= set(graph)
  assert "patchdiff.checkpoint" in graph["patchdiff.train"]  # the reader sees real edges
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_only_the_input_path_imports_tensorflow():
  users = sorted(name for name, path in _modules().items()
                 if any(isinstance(n, (ast.Import, ast.ImportFrom))
                        and any((a.name if isinstance(n, ast.Import) else n.module or "")
                                .split(".")[0] in ("tensorflow", "tensorflow_datasets")
                                for a in n.names)
                        for n in ast.walk(ast.parse(path.read_text()))))
  assert users and all(u.startswith("patchdiff.data.") for u in users), users


def test_sampling_from_a_checkpoint_does_not_import_tensorflow(tmp_path):
  from patchdiff import checkpoint  # pylint: disable=import-outside-toplevel
  from patchdiff.nn import models  # pylint: disable=import-outside-toplevel
  cfg = tiny.tiny_config(**{"sample.grid_size": 2})
  checkpoint.save_weights(str(tmp_path), models.create_denoiser(cfg.model), cfg, step=5)
  flags = tiny.flags(**{"sample.grid_size": 2})
  script = (
      "import runpy, sys\n"
      f"sys.argv = ['main', '--config={tiny.PATH}', '--workdir={tmp_path}', '--mode=sample',"
      f" '--seeds=0-1', *{flags!r}]\n"
      "try:\n  runpy.run_module('patchdiff.main', run_name='__main__')\n"
      "except SystemExit as e:\n  assert not e.code, e.code\n"
      "print('LOADED', sorted({m.split('.')[0] for m in sys.modules}))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  loaded = proc.stdout.split("LOADED", 1)[1]
  assert "'patchdiff'" in loaded and "'jax'" in loaded  # the listing is real
  assert "tensorflow" not in loaded
  assert (tmp_path / "samples" / "step_00000005" / "000000" / "000001.png").is_file()


@pytest.mark.parametrize("module,names", [
    ("patchdiff.convert", ["load_torch_state_dict", "read_state_dict"]),
    ("patchdiff.sampling", ["heun_sample"]),
    ("patchdiff.vae", ["load_vae", "encode_fn", "decode_fn"]),
    ("patchdiff.inception", ["load_weights", "features"]),
    ("patchdiff.train", ["Run", "train_and_evaluate"]),
    ("patchdiff.programs", ["Programs", "Step", "jaxpr_flops", "program_stats"]),
    ("patchdiff.generate", ["Sampler", "sample_from_checkpoint", "load_image_pm1"]),
    # evaluation keeps the names that moved to generate.
    ("patchdiff.evaluation", ["evaluate", "fid_reference", "QualityMonitor",
                              "sample_from_checkpoint", "UsageError"]),
    # config_lib keeps the names that moved out of it, for config files and users' code.
    ("patchdiff.config_lib", ["base_config", "data_config", "override", "validate", "finalize",
                              "patch_schedule", "pixel64_config", "latent256_config",
                              "apply_args", "accumulation_rounds", "check_compatible",
                              "model_differences"]),
    ("patchdiff.presets", ["pixel64", "latent256", "apply_args"]),
    ("patchdiff.accumulation", ["batch_per_device", "rounds_per_bucket"]),
    ("patchdiff.checkpoint", ["check_compatible", "model_differences", "load_ema"]),
    # torch_pickle keeps the names that moved to the modules below, for users and tests.
    ("patchdiff.weights.torch_pickle", ["read_file", "read_archive", "read_legacy", "unpickle",
                                        "state_dict", "reading", "zip_records",
                                        "check_zip_record", "short_repr", "TorchPickleError",
                                        "InertObject", "ScriptObject", "PersistentObject",
                                        "TorchModule", "RestrictedUnpickler"]),
    ("patchdiff.weights.torch_archive", ["read_file", "read_archive", "read_legacy", "unpickle",
                                         "zip_records", "check_zip_record"]),
    ("patchdiff.weights.unpickler", ["RestrictedUnpickler"]),
    ("patchdiff.weights.inert_objects", ["InertObject", "ScriptObject", "PersistentObject",
                                         "TorchModule"]),
    ("patchdiff.weights.snapshot_pkl", ["read_storage_bytes_with"]),
    ("patchdiff.weights.state_dicts", ["state_dict"]),
    ("patchdiff.weights.read_context", ["TorchPickleError", "reading", "short_repr"]),
    ("patchdiff.data.latent_shards", ["publish_json", "remove_temporary", "claim_spec",
                                      "write_shard", "shard_done", "shard_damage",
                                      "prepare_slice", "write_manifest", "slice_totals"]),
    # encode_latents keeps the command line and the encoding loop.
    ("patchdiff.encode_latents", ["encode_dataset", "vae_digest", "define_flags", "main"]),
])
def test_public_entry_points_stay_importable(module, names):
  mod = importlib.import_module(module)
  assert all(callable(getattr(mod, n)) for n in names)
