"""The weight reader against hostile files: one crafted file per class of attack
(`hostile_files.corpus`) and a fuzzer's mutations of real files, all read by
`files.read_state_dict` in one subprocess under an address-space limit, each within 10 s and
200 MB of added peak memory; and the bounds of the copies `torch_io` makes of a snapshot's
plain data."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import hostile_files
from conftest import REPO, reference_dir
from patchdiff.weights import files, torch_pickle
from torch_archive import Script, Shared, Tensor, legacy_save, records

SEEDS = 256  # fuzzer mutations per run, spread over the sources
SECONDS, ADDED_MB = 10.0, 200.0


def _fuzz_sources(folder) -> list[str]:
  """A torch zip archive, a legacy file and (where the reference fixtures are) two official
  network snapshots, each with views, shared storages, modules and several dtypes."""
  s = np.arange(24, dtype=np.float32)
  module = Script("torch.nn.modules.container.Sequential", {
      "_parameters": {"w": Tensor(s, 2, (3, 2), (1, 3), key="s")},
      "_buffers": {"b": np.ones(3, np.float16)}, "_modules": {}, "training": False})
  archive = folder / "fuzz_archive.pt"
  archive.write_bytes(hostile_files.zip_bytes([hostile_files.Record(n, d) for n, d in records(
      {"model": module, "step": 7, "v": Tensor(s, 0, (24,), (1,), key="s"),
       "i": np.array([5, -6], np.int64)}).items()]))
  legacy = folder / "fuzz_legacy.pth"
  legacy.write_bytes(legacy_save({"a": Tensor(s, 0, (4, 6), (6, 1), key="k"),
                                  "t": Tensor(s, 0, (6, 4), (1, 6), key="k"),
                                  "h": np.array([1.5], np.float16)}))
  parity = reference_dir() / "parity"
  snapshots = [parity / f"{n}_snapshot.pkl" for n in ("ddpmpp_tiny", "edm_ddpmpp_tiny")]
  return [str(p) for p in [archive, legacy] + [p for p in snapshots if p.is_file()]]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  """The reader's outcomes on the corpus and the fuzzer's mutations, read in one subprocess."""
  corpus = tmp_path_factory.mktemp("hostile")
  for case in hostile_files.corpus():
    (corpus / case.name).write_bytes(case.data)
  sources = _fuzz_sources(tmp_path_factory.mktemp("fuzz_sources"))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
  run = subprocess.run([sys.executable, str(REPO / "tests" / "hostile_files.py"), str(corpus),
                        *sources, "--seeds", str(SEEDS)], capture_output=True, text=True,
                       timeout=300, env=env, cwd=REPO, check=False)
  assert run.returncode == 0, run.stderr[-4000:]
  got = json.loads(run.stdout)
  got["folder"] = str(corpus)
  return got


def test_each_hostile_file_is_refused_by_name_in_bounded_time_and_memory(report):
  problems = []
  for case in hostile_files.corpus():
    got = report["corpus"][case.name]
    path = os.path.join(report["folder"], case.name)
    if got["seconds"] > SECONDS or got["added_mb"] > ADDED_MB:
      problems.append(f"{case.name}: {got['seconds']:.1f} s, {got['added_mb']:.0f} MB")
    if case.expect is None:
      if got["error"] is not None or got["names"] != list(case.reads):
        problems.append(f"{case.name}: expected to read {case.reads}, got {got}")
    elif (got["error"] != "TorchPickleError" or not got["message"].startswith(path)
          or case.expect not in got["message"]):
      problems.append(f"{case.name} ({case.attack}): expected a TorchPickleError naming the file "
                      f"and saying {case.expect!r}, got {got}")
  assert not problems, "\n".join(problems)


def test_fuzzed_files_give_the_readers_error_or_a_result(report):
  fuzz = report["fuzz"]
  assert len(fuzz) == SEEDS
  problems = []
  for got in fuzz:
    if got["seconds"] > SECONDS or got["added_mb"] > ADDED_MB:
      problems.append(f"seed {got['seed']}: {got['seconds']:.1f} s, {got['added_mb']:.0f} MB")
    if got["error"] is None:
      if not got["ok"]:
        problems.append(f"seed {got['seed']}: not a dict of named arrays")
    elif (got["error"] != "TorchPickleError" or not got["message"].startswith(got["path"])
          or "ran out of memory" in got["message"] or "too deeply" in got["message"]):
      problems.append(f"seed {got['seed']} ({got['source']}): {got['error']}: {got['message']}")
  assert not problems, "\n".join(problems)
  assert any(got["error"] is None for got in fuzz)  # some mutations leave a readable file


def test_torch_io_plain_copies_are_bounded():
  # pylint: disable=protected-access
  assert files._plain({"a": [1, (2.5, "x")], "b": np.float32(3)}) == {
      "a": [1, (2.5, "x")], "b": 3.0}
  cycle = [1]
  cycle.append(cycle)
  assert files._plain(cycle) is files._OPAQUE
  deep = []
  for _ in range(files.PLAIN_DEPTH + 1):
    deep = [deep]
  assert files._plain(deep) is files._OPAQUE
  dag = [0]
  for _ in range(40):  # 2**40 entries written out
    dag = [dag, dag]
  assert files._plain(dag) is files._OPAQUE
  # One allowance for all of a network's attributes: each may be the same large value.
  shared = list(range(1000))
  got = files._plain_items({f"a{i}": shared for i in range(1000)})
  assert 0 < len(got) <= files.PLAIN_ITEMS // 1000


def test_state_dict_lists_a_shared_module_under_each_path_and_refuses_a_clash():
  layer = Shared(Script("torch.nn.modules.container.Sequential", {
      "_parameters": {"weight": np.ones(2, np.float32)}, "_buffers": {}, "_modules": {}}))
  graph = torch_pickle.read_archive(hostile_files.zip_bytes([
      hostile_files.Record(n, d) for n, d in records(
          {"enc": [layer], "dec": [layer]}).items()]), source="tied.pt")
  state = torch_pickle.state_dict(graph)
  assert list(state) == ["enc.0.weight", "dec.0.weight"]
  assert state["enc.0.weight"] is state["dec.0.weight"]
  with pytest.raises(torch_pickle.TorchPickleError, match="tied.pt: two tensors are named 'a.b'"):
    torch_pickle.state_dict({"a.b": np.zeros(1), "a": {"b": np.ones(1)}}, source="tied.pt")
