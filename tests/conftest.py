"""Shared test setup: where the reference fixtures live, and small configs."""
import gc
import importlib
import os
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# NumPy's BLAS on one thread (before numpy loads; subprocesses inherit it): the suite runs two
# workers on two cores, where a second BLAS thread only competes with the other worker.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# XLA's CPU backend spends most of a test's time compiling. The suite compiles with settings of
# its own (`SUITE_FLAGS`, in XLA_FLAGS; subprocesses inherit them): LLVM's optimisations off
# (level 0, ~30% faster compiles), XLA's older elemental emitters for fused loops instead of its
# MLIR fusion emitters (half the compile time of a tiny train step's programs; they run ~10%
# slower, which the tiny test models don't feel), each program's code generated in one piece
# rather than split over threads (on two busy cores the split only adds work: ~15% less CPU per
# compile), and convolutions and matrix products run on the calling thread instead of being split
# over Eigen's thread pool (the two workers already keep both cores busy: splitting the tiny
# models' products only adds synchronisation). With a level in XLA_FLAGS the package passes no
# compile options (`xla_options`): the tests that run the package as a user does take
# `user_xla_flags`.
LEVEL_FLAG = "--xla_backend_optimization_level="
SUITE_FLAGS = (f"{LEVEL_FLAG}0", "--xla_cpu_use_fusion_emitters=false",
               "--xla_cpu_parallel_codegen_split_count=1", "--xla_cpu_multi_thread_eigen=false")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *SUITE_FLAGS]).strip()

# A module-level program that xla_options jits: `NAME = xla_options.jit(` or `lazy_jit(`, or a
# top-level function under `@xla_options.jit` / `@xla_options.lazy_jit`.
_MODULE_PROGRAM = re.compile(r"^(\w+) = (?:xla_options\.)?(?:lazy_jit|jit)\(|"
                             r"^@(?:xla_options\.)?(?:lazy_jit|jit)\b[^\n]*\ndef (\w+)", re.M)


def module_programs() -> dict[tuple[str, str], object]:
  """{(module, name): program} of every module-level program of the package that xla_options
  jits, found in the source text."""
  found = {}
  for path in sorted((REPO / "patchdiff").rglob("*.py")):
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    for a, b in _MODULE_PROGRAM.findall(path.read_text()):
      found[module, a or b] = getattr(importlib.import_module(module), a or b)
  return found


def user_flags() -> str:
  """XLA_FLAGS without the suite's own settings (`SUITE_FLAGS`), as a user runs the package: its
  programs compile with the package's own options."""
  suite = {f.split("=")[0] for f in SUITE_FLAGS}
  return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                  if f.split("=")[0] not in suite)


@pytest.fixture
def user_xla_flags(monkeypatch):
  """XLA_FLAGS set to `user_flags()` for the test (`xla_options` reads XLA_FLAGS at each call, so
  an in-process test compiles the user's programs; subprocesses inherit it). XLA read the suite's
  settings when this process started, so the package's programs are also given XLA's default
  fusion emitters back as a compile option (the codegen split stays: it divides the same work
  differently, and changes no instruction). The module-level programs' caches are emptied before
  and after, so that the test makes them under its own flags whatever ran before it in the
  process."""
  from patchdiff import xla_options  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("XLA_FLAGS", user_flags())
  monkeypatch.setattr(xla_options, "CPU_OPTIONS",
                      dict(xla_options.CPU_OPTIONS, xla_cpu_use_fusion_emitters=True))
  programs = module_programs().values()
  for program in programs:
    program.program.cache_clear()
  yield
  for program in programs:
    program.program.cache_clear()


# The files that take minutes (end-to-end runs), longest first: handed out first, they keep both
# xdist workers busy to the end instead of leaving one to run a long file alone. test_configs.py
# goes early: its ImageNet smoke run compiles the programs that test_latent.py's training then
# finds in the persistent cache (run at the same time, both would compile them).
LONGEST_FIRST = ("test_main.py", "test_eight_devices.py", "test_configs.py", "test_train.py",
                 "test_init_from.py", "test_phema_training.py",
                 "test_fid_cli.py", "test_accumulation.py", "test_latent.py", "test_compile.py",
                 "test_latent_stream.py", "test_convert.py", "test_official_pkl.py")


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  """Runs before pytest's own clean-up at the end of a session, which collects garbage five times
  over (to report exceptions raised by finalizers): over the heap that JAX, XLA and TensorFlow
  leave in a worker, that took seconds. Every object that lives now is moved out of the
  collector's reach first; the process ends right after."""
  gc.freeze()


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable


def reference_dir() -> pathlib.Path:
  """$PATCHDIFF_REFERENCE, default ../shared/reference (relative to the repository root)."""
  path = pathlib.Path(os.environ.get("PATCHDIFF_REFERENCE", "../shared/reference"))
  return path if path.is_absolute() else (REPO / path).resolve()


@pytest.fixture(scope="session")
def reference():
  """The reference folder; skips the test where it is absent, except under CI where that fails."""
  path = reference_dir()
  if not (path / "parity").is_dir():
    msg = (f"reference fixtures not found at {path} (set PATCHDIFF_REFERENCE to the folder "
           "holding parity/ and the *_state_dict.txt files)")
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  return path


@pytest.fixture(scope="session")
def inception_weights():
  """The installed FID Inception weights (default_1.pt); skips where absent, except under CI
  where that fails."""
  from patchdiff.nn import inception  # pylint: disable=import-outside-toplevel
  path = inception.default_weights_path()
  if path is None:
    msg = f"NVIDIA's FID Inception weights are not installed ({inception.DEFAULT_INSTALL})"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  return path


def state_dict_shapes(path) -> dict[str, tuple[int, ...]]:
  """name -> shape of a reference `*_state_dict.txt` (tab-separated, `#` comments)."""
  out = {}
  for line in pathlib.Path(path).read_text().splitlines():
    if line.startswith("#") or not line.strip():
      continue
    name, shape = line.split("\t")
    out[name] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
  return out


# The configs of the two parity fixtures (see reference/README.md).
import tiny  # pylint: disable=wrong-import-position  (after XLA_FLAGS: it imports the package)
from patchdiff import main as entry_point  # pylint: disable=wrong-import-position

DDPMPP_TINY = tiny.MODEL  # the network of the tiny run every test shares (tests/tiny.py)
ADM_TINY = dict(arch="adm", img_resolution=16, img_channels=3, model_channels=32,
                channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0, label_dim=5)
FIXTURES = {"ddpmpp_tiny": DDPMPP_TINY, "adm_tiny_cond": ADM_TINY}

# The collector thresholds that the entry point sets for users, here from the start (a test that
# calls the entry point in-process sets them anyway).
gc.set_threshold(*entry_point.GC_THRESHOLDS)


MIN_CACHED_COMPILE_SECS = 0.02


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent XLA cache for the session, shared by the xdist workers and the subprocesses
  the tests start: the end-to-end runs compile the same programs again and again (XLA on CPU
  takes seconds each). An entry read while another process is still writing it fails to load
  with a warning, and is compiled instead. Programs that compile in under 20 ms are not kept
  (thousands of eager operations, whose writing and reading would cost about what compiling
  them does; every step, sampler and network program of the suite takes longer)."""
  import jax  # pylint: disable=import-outside-toplevel
  if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' temporary folders share a parent
    folder = tmp_path_factory.getbasetemp().parent / "jax_cache"
    folder.mkdir(exist_ok=True)
    path = str(folder)
  else:
    path = str(tmp_path_factory.mktemp("jax_cache"))
  os.environ.update(JAX_COMPILATION_CACHE_DIR=path,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(MIN_CACHED_COMPILE_SECS),
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_CACHED_COMPILE_SECS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


@pytest.fixture(scope="session")
def vae_dir(reference, tmp_path_factory):
  """The tiny diffusers VAE fixture (`parity/vae_tiny_*`) as a diffusers-format folder."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  folder = tmp_path_factory.mktemp("vae")
  arrays = dict(np.load(reference / "parity" / "vae_tiny_weights.npz"))
  save_file(arrays, str(folder / "diffusion_pytorch_model.safetensors"))
  (folder / "config.json").write_text((reference / "parity" / "vae_tiny_config.json").read_text())
  return folder


def run_on_eight_devices(script: str, timeout: int, *args: str) -> dict:
  """Runs `tests/<script> ARGS` on 8 fake CPU devices and returns the JSON it prints after
  `RESULTS `."""
  import json  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
             PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, f"tests/{script}", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")]
  assert proc.returncode == 0 and lines, proc.stderr[-4000:]
  return json.loads(lines[0][len("RESULTS "):])


def main_in_process(*args):
  """`python -m patchdiff.main ARGS`, in this process: the entry point's own flag parsing and
  dispatch, without a new interpreter (for what a subprocess would prove nothing more about:
  flag errors, bad inputs, more samples from a checkpoint). The flags and absl's log level (which
  parsing --verbosity sets) are as before afterwards."""
  import logging  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from unittest import mock  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  from absl.testing import flagsaver  # pylint: disable=import-outside-toplevel
  from patchdiff import main as entry  # pylint: disable=import-outside-toplevel
  argv = ["patchdiff.main", *args]
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  # The config flag reads its --config.KEY overrides from sys.argv.
  try:
    with flagsaver.flagsaver(), mock.patch.object(sys, "argv", argv):
      flags.FLAGS.unparse_flags()
      entry.main(flags.FLAGS(argv))
  finally:
    absl_logger.setLevel(level)


@pytest.fixture
def stub_inception(monkeypatch):
  """The FID Inception replaced by a cheap stand-in, for tests of the FID plumbing rather than its
  numbers (the real network has its own tests in test_inception.py, and test_main.py's eval runs
  it as a user does): its features are 16 fixed random projections of the pixels, zero-padded to
  2048, and the Frechet distance is taken over those 16 (its matrix square roots would take
  minutes at 2048). Returns the feature function."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from patchdiff import evaluation  # pylint: disable=import-outside-toplevel
  distance = evaluation.metrics.frechet_distance
  monkeypatch.setattr(evaluation.metrics, "frechet_distance", lambda m1, s1, m2, s2: distance(
      m1[:16], s1[:16, :16], m2[:16], s2[:16, :16]))
  rng, projections = np.random.default_rng(0), {}

  def features(_, images):
    x = np.asarray(images, np.float64).reshape(len(images), -1)
    x = x @ projections.setdefault(x.shape[1], rng.standard_normal((x.shape[1], 16)))
    return np.concatenate([x, np.zeros((len(x), 2048 - x.shape[1]))], axis=1)
  monkeypatch.setattr(evaluation, "load_inception", lambda path: "stub")
  monkeypatch.setattr(evaluation.inception, "features", features)
  monkeypatch.setattr(evaluation.inception, "default_weights_path", lambda: "stub")
  return features
