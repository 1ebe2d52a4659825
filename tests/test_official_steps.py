"""The official training loop's recorded steps, replayed through patchdiff's own train step.

Each `parity/train_step_*.npz` of the reference folder (see its README) holds a few steps of the
official `training_loop.py`, run on a CPU: every random draw (images, patch size, crop offsets,
noise levels, noise) and every state reached (per-sample loss, gradients, learning rate, weights
after Adam, EMA). The replay builds everything from the fixture's `config`: the network from its
official keywords (`pretrained.official_model_config`), loaded from `init/*` with the project's
loader; the run config from its recipe. Each step then goes through what training runs: the
pipeline's crops and coordinates (`pipeline.crop_patches`), the trainer's gradient program
(`Run.grad_step_fn`, the recorded draws entering through `train_step.RECORDED_DRAWS`), the
host's image count, learning rate and EMA decay (`PatchSchedule`, `step_hyperparameters`), the
trainer's compiled update program (Adam, loss scaling, gradient guard, EMA). Nothing of the
step is written again here; the official loop's count, the oracle, is its README's rule.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import reference_dir
from patchdiff import config_lib, patches, pretrained, programs, train, train_step
from patchdiff.data import pipeline
from patchdiff.nn import edm, models, torch_io

FIXTURES = sorted((reference_dir() / "parity").glob("train_step_*.npz"))


def run_config(fixture: dict, data_zip) -> "config_lib.ml_collections.ConfigDict":
  """patchdiff's config of the fixture's recipe (official names -> ours)."""
  c = config_lib.base_config()
  model = pretrained.official_model_config(
      dict(fixture["net"], img_resolution=fixture["res"], img_channels=fixture["img_channels"],
           label_dim=fixture["label_dim"]), coordinates=False)
  c.model.update(model)
  c.data.source = "zip"
  c.data.path = str(data_zip)
  c.data.resolution = fixture["res"]
  c.data.labels = bool(fixture["label_dim"])
  c.patch.real_p = fixture["real_p"]
  c.patch.schedule = "progressive" if fixture["progressive"] else "stochastic"
  t = c.train
  t.batch_size = fixture["batch_size"]
  t.lr = fixture["lr"]
  t.lr_rampup_kimg = fixture["lr_rampup_kimg"]
  t.ema_mimg = fixture["ema_halflife_kimg"] / 1000
  t.ema_rampup = fixture["ema_rampup_ratio"]
  t.p_mean, t.p_std = fixture["P_mean"], fixture["P_std"]
  t.adam_b1, t.adam_b2 = fixture["adam_betas"]
  t.adam_eps = fixture["adam_eps"]
  t.loss_scaling, t.loss_scale = "static", float(fixture["loss_scaling"])
  t.start_kimg = fixture["resume_kimg"]
  t.duration_mimg = fixture["total_kimg"] / 1000
  t.steps = 0  # from the duration, as the official loop's length
  return config_lib.finalize(c)


def official_nimg(fixture: dict, sizes: list[int]) -> list[int]:
  """The official loop's cur_nimg before each step and after the last, by its README's rule:
  it starts at resume_kimg * 1000 and adds int(batch_size * batch_mul_avg) a step,
  batch_mul_avg the schedule's mean (stochastic) or the step's own batch_mul (progressive)."""
  res, p = fixture["res"], fixture["real_p"]
  mean = np.sum(np.array([(1 - p) * 2 / 5, (1 - p) * 3 / 5, p]) * np.array([4, 2, 1]))
  out = [int(fixture["resume_kimg"] * 1000)]
  for size in sizes:
    avg = res // size if fixture["progressive"] else mean
    out.append(out[-1] + int(fixture["batch_size"] * avg))
  return out


def step_batch(z, s: int, fixture: dict) -> dict[str, np.ndarray]:
  """Step s's batch as the pipeline sends it (crops and coordinates by its own function; pixels
  as uint8 when the recorded images are whole pixel values), with the recorded draws."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  res, size = fixture["res"], int(z[f"s{s}_patch_size"])
  images = np.transpose(z[f"s{s}_images"], (0, 2, 3, 1))  # (N, R, R, C) in [-1, 1]
  pixels = np.rint((images + 1) * 127.5).astype(np.uint8)
  exact = np.array_equal(train_step.model_images(pixels), images)
  n = len(images)
  oi, oj = z[f"s{s}_i"].astype(np.int32), z[f"s{s}_j"].astype(np.int32)
  flip = np.zeros(n, bool)
  source = pixels.astype(np.float32) if exact else images
  crops = pipeline.crop_patches(tf, source, np.arange(n), oi, oj, flip, size, res).numpy()
  grid = whole_grid(res)
  batch = dict(image=crops.astype(np.uint8) if exact else crops,
               pos=pipeline.crop_patches(tf, grid, np.zeros(n, np.int32), oi, oj, flip, size,
                                         res).numpy(),
               rnd_normal=z[f"s{s}_rnd_normal"].reshape(n),
               noise=np.transpose(z[f"s{s}_noise"], (0, 2, 3, 1)))
  if fixture["label_dim"]:
    batch["label"] = z[f"s{s}_labels"].astype(np.float32)
  return batch


def whole_grid(res: int) -> np.ndarray:
  """The whole image's coordinates, which the pipeline crops as it crops the images."""
  return patches.coord_grid(np.zeros(1), np.zeros(1), res, res)


def official(tree, run, state) -> dict[str, np.ndarray]:
  """A params-shaped tree (weights, gradients or EMA) under the official names, torch layout."""
  return models.torch_state_dict(nnx.merge(run.graphdef, tree, state["buffers"]))


def params_tree(arrays: dict[str, np.ndarray], run, state):
  """Official-named tensors (torch layout) as a tree like `state["params"]`."""
  den = nnx.merge(run.graphdef, state["params"], state["buffers"], copy=True)
  targets = torch_io.variables(den, models.TORCH_LAYERS)
  buffers = [name for name, (var, _) in targets.items() if not isinstance(var, nnx.Param)]
  values = torch_io.match(den, arrays, models.TORCH_LAYERS, absent=buffers)
  for name, value in values.items():
    targets[name][0].set_value(jnp.asarray(value))
  return nnx.split(den, nnx.Param, ...)[1]


def worst(got: dict, want_prefix: str, z) -> tuple[str, float]:
  """The tensor whose largest |got - recorded| is largest relative to its largest recorded
  entry, and that ratio."""
  out = ("", 0.0)
  for key in z.files:
    if key.startswith(want_prefix):
      name = key[len(want_prefix):]
      want = z[key]
      err = float(np.max(np.abs(got[name] - want)) / max(float(np.max(np.abs(want))), 1e-30))
      out = max(out, (name, err), key=lambda x: x[1])
  return out


@pytest.mark.parametrize("path", FIXTURES or [None], ids=lambda p: p.name if p else "none")
def test_replays_the_official_loop_step_for_step(path, reference):
  if path is None:
    pytest.fail(f"no parity/train_step_*.npz in {reference}")
  z = np.load(path)
  fixture = json.loads(str(z["config"]))
  cfg = run_config(fixture, path.parent / fixture["data_zip"])
  run = train.Run(cfg)
  sched, tcfg = run.schedule, cfg.train
  init = {k[len("init/"):]: z[k] for k in z.files if k.startswith("init/")}
  values, zeroed, fresh = models.pretrained_values(init, cfg.model, where=path.name)
  assert not zeroed and not fresh
  state = run.init_state(values)
  assert set(official(state["params"], run, state)) >= set(init)
  apply = programs.Programs(run).update_program()
  steps = int(fixture["steps"])
  sizes = [int(z[f"s{s}_patch_size"]) for s in range(steps)]
  counted = official_nimg(fixture, sizes)
  nimg = sched.start_nimg
  grad_fns = {}

  @jax.jit
  def per_sample_loss(params, buffers, batch):  # what the gradient program differentiates
    draws = edm.training_draws(jax.random.key(0), batch["image"].shape)
    draws.update({k: batch[k] for k in train_step.RECORDED_DRAWS})
    return edm.loss_of_draws(nnx.merge(run.graphdef, params, buffers),
                             train_step.model_images(batch["image"]), batch["pos"],
                             batch.get("label"), draws, p_mean=tcfg.p_mean, p_std=tcfg.p_std)
  for s, size in enumerate(sizes):
    where = f"{path.name} step {s} ({size} px)"
    # The image count before the step, and the learning rate and EMA decay it gives.
    assert nimg == counted[s], where
    if not fixture["progressive"]:  # the trainer's own count of step s (sizes its own draw)
      assert int(sched.nimg_before([s])[0]) == nimg, where
    lr, beta = train_step.step_hyperparameters(tcfg, sched, nimg, size)
    assert lr == pytest.approx(float(z[f"s{s}_lr"]), rel=1e-9, abs=0), where
    if not fixture["progressive"]:  # what the loop hands the update program at step s
      np.testing.assert_array_equal(np.asarray(run.hyper(s, size)), np.float32([lr, beta]))
    # The loss and its gradient: the trainer's gradient program, fed the recorded draws.
    batch = step_batch(z, s, fixture)
    assert len(batch["image"]) == cfg.train.batch_size * (fixture["res"] // size), where
    if size not in grad_fns:
      grad_fns[size] = run.jit(run.grad_step_fn(size))
    grads, loss = grad_fns[size](state, batch)
    per_sample = np.asarray(per_sample_loss(state["params"], state["buffers"], batch))
    np.testing.assert_allclose(per_sample, z[f"s{s}_loss"], rtol=1e-5, err_msg=where)
    np.testing.assert_allclose(float(loss), z[f"s{s}_loss"].mean(), rtol=1e-5, err_msg=where)
    name, err = worst(official(grads, run, state), f"s{s}_grad/", z)
    assert err <= 1e-4, f"{where}: gradient {name} off by {err:.2e} of its largest entry"
    # Adam, the guard, the EMA: the trainer's update program, given the official gradients.
    # (Fed its own, it moves the weights the same way wherever the gradient is more than
    # rounding noise; where it is noise, Adam's g / (sqrt(v) + eps) is noise / eps. Attention's
    # key biases have an exactly zero gradient: ~1e-11 here, in either implementation's own
    # rounding, which moves those weights by up to 0.1 lr apart.)
    recorded = {k[len(f"s{s}_grad/"):]: z[k] for k in z.files if k.startswith(f"s{s}_grad/")}
    hyper = jax.device_put(np.float32([lr, beta]), run.replicated)
    state, metrics = apply(state, params_tree(recorded, run, state), loss, hyper)
    assert (float(metrics["lr"]), float(metrics["ema_beta"])) == (np.float32(lr),
                                                                    np.float32(beta)), where
    assert int(state["step"]) == s + 1
    tol = 0.05 * float(z[f"s{s}_lr"])
    for which, prefix in (("params", f"s{s}_param/"), ("ema", f"s{s}_ema/")):
      got = official(state[which], run, state)
      for key in (k for k in z.files if k.startswith(prefix)):
        diff = float(np.max(np.abs(got[key[len(prefix):]] - z[key])))
        assert diff <= tol, f"{where}: {which} {key[len(prefix):]} off by {diff:.3g} > {tol:.3g}"
    nimg += sched.step_images(size)
    assert nimg == counted[s + 1], where
