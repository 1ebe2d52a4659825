"""The FID Inception-v3 feature extractor in Flax NNX (NHWC, float32): 2048-d pool features.

This is the 2015-12-05 TensorFlow Inception-v3 that FID is defined with (Heusel et al. 2017), in
the layout of pytorch-fid's `FIDInceptionA/C/E` variant of torchvision's `Inception3`: the
`branch_pool` average pools of the A, C and first E blocks leave the zero padding out of the
average (`count_include_pad=False`), and the last E block (`Mixed_7c`) max-pools instead. The
layer names follow torchvision, so a PyTorch state dict maps one to one (see `load_state_dict`).

Weights. Nothing is downloaded: the user supplies the file. Use
`pt_inception-2015-12-05-6726825d.pth` (its SHA-256 begins 6726825d, which `load_weights`
checks for files named this way), the PyTorch port of the TensorFlow graph distributed by
pytorch-fid (mseitzer/pytorch-fid, GitHub release "FID weights"), either as is (`.pth`, needs
torch) or converted once to `.npz` (see `load_weights`). NVIDIA's `inception-2015-12-05.pkl`, which
StyleGAN2-ADA / EDM use, is a TorchScript pickle of the same network (same weights) with its own
input resize; it is not read here.

Preprocessing (`preprocess`) is pytorch-fid's: uint8 -> [0, 1] -> bilinear resize to 299x299
without antialiasing (torch's `F.interpolate(mode="bilinear", align_corners=False)`) -> [-1, 1].
`jax.image.resize` is the closest JAX equivalent but not bit-identical to torch, and the NVIDIA
pickle resizes differently again; such resizing details move FID slightly (typically in the
second decimal), so compare FIDs only when computed with the same pipeline.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

RESOLUTION = 299
FEATURE_DIM = 2048

# State-dict entries present in the weight file but not needed for pool features.
_IGNORED_PREFIXES = ("fc.",)
_IGNORED_SUFFIXES = (".num_batches_tracked",)

def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


# ---------------------------------------------------------------------------------------------
# Pooling helpers (NHWC).


def max_pool(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 0) -> jax.Array:
  """Max pool over H, W; padded positions are -inf, i.e. never selected (as in torch)."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                               (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x: jax.Array, window: int = 3, stride: int = 1,
                         padding: int = 1) -> jax.Array:
  """Average pool over H, W that leaves zero padding out of the average.

  Equals torch's `F.avg_pool2d(..., count_include_pad=False)`: each output is the mean over the
  window positions that fall inside the input, so a constant input stays constant at the borders.
  """
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  dims, strides = (1, window, window, 1), (1, stride, stride, 1)
  sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pad)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  counts = jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, strides, pad)
  return sums / counts


# ---------------------------------------------------------------------------------------------
# Layers.


class BasicConv2d(nnx.Module):
  """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int],
               stride: int = 1, padding: int | tuple[int, int] = 0, *, rngs: nnx.Rngs):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(in_ch, out_ch, kernel_size=_pair(kernel), strides=_pair(stride),
                         padding=((ph, ph), (pw, pw)), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(out_ch, use_running_average=True, epsilon=1e-3, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
  """35x35 block: 1x1, 5x5, double 3x3 and pooled branches -> 224 + pool_features channels."""

  def __init__(self, in_ch: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(in_ch, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(in_ch, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(in_ch, pool_features, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """35x35 -> 17x17 reduction: 384 + 96 + in_ch channels."""

  def __init__(self, in_ch: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, max_pool(x)], axis=-1)


class InceptionC(nnx.Module):
  """17x17 block with factorised 7x7 convolutions (c7 inner channels) -> 768 channels."""

  def __init__(self, in_ch: int, c7: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(in_ch, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(in_ch, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(in_ch, 192, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    bp = self.branch_pool(avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
  """17x17 -> 8x8 reduction: 320 + 192 + in_ch channels."""

  def __init__(self, in_ch: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv2d(in_ch, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                  self.branch7x7x3_4):
      b7 = layer(b7)
    return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)


class InceptionE(nnx.Module):
  """8x8 block with split 1x3 / 3x1 convolutions -> 2048 channels.

  `max_pool_branch` selects the pooling of `branch_pool`: False = average excluding padding
  (FID's Mixed_7b), True = 3x3 max pool, stride 1, pad 1 (FID's Mixed_7c).
  """

  def __init__(self, in_ch: int, max_pool_branch: bool = False, *, rngs: nnx.Rngs):
    self.max_pool_branch = max_pool_branch
    self.branch1x1 = BasicConv2d(in_ch, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(in_ch, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(in_ch, 192, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = (max_pool(x, stride=1, padding=1) if self.max_pool_branch
              else avg_pool_exclude_pad(x))
    bp = self.branch_pool(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nnx.Module):
  """FID Inception-v3 up to the global average pool: (N, 299, 299, 3) in [-1, 1] -> (N, 2048)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, rngs=rngs)
    self.Mixed_7c = InceptionE(2048, max_pool_branch=True, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = max_pool(x)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))


def create(seed: int = 0) -> InceptionV3:
  """A randomly initialised network (for tests and shapes; load real weights for FID).

  Built cheaply: the structure is traced abstractly (`nnx.eval_shape`) and the tensors drawn with
  NumPy (conv kernels ~ N(0, 2 / fan_in), He scaling, so activations stay of order one through
  the ReLUs; batch norm at identity), which avoids compiling one XLA random-number program per
  kernel shape.
  """
  model = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, BasicConv2d):
      shape = node.conv.kernel.shape
      std = np.sqrt(2.0 / np.prod(shape[:3]))
      node.conv.kernel.set_value(
          jnp.asarray(rng.standard_normal(shape, np.float32) * np.float32(std)))
      channels = shape[-1]
      for var, fill in ((node.bn.scale, 1.0), (node.bn.bias, 0.0), (node.bn.mean, 0.0),
                        (node.bn.var, 1.0)):
        var.set_value(jnp.full((channels,), fill, jnp.float32))
  return model


# ---------------------------------------------------------------------------------------------
# Preprocessing and feature extraction.


def preprocess(images: Any) -> jax.Array:
  """uint8 (N, H, W, 3) -> float32 (N, 299, 299, 3) in [-1, 1], as pytorch-fid does.

  Scales to [0, 1], resizes bilinearly to 299x299 without antialiasing (the counterpart of
  torch's `F.interpolate(mode="bilinear", align_corners=False)`), then maps to [-1, 1].
  """
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  n, _, _, c = x.shape
  x = jax.image.resize(x, (n, RESOLUTION, RESOLUTION, c), "bilinear", antialias=False)
  return 2.0 * x - 1.0


def _apply(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state)(preprocess(images))


# The graph definition is static: models of the same structure share the compiled programs.
_forward = jax.jit(_apply, static_argnums=0)


def features(model: InceptionV3, images: Any, batch_size: int = 64) -> np.ndarray:
  """2048-d pool features of uint8 images (N, H, W, 3), as float64 (N, 2048).

  Runs in batches of `batch_size` (one jitted program per image size: the last batch is padded
  with zero images and the padding dropped).
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected images of shape (N, H, W, 3), got {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"expected uint8 images, got {images.dtype}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  n = images.shape[0]
  batch_size = min(batch_size, max(n, 1))  # a handful of images is not padded to a whole batch
  graphdef, state = nnx.split(model)
  out = []
  for start in range(0, n, batch_size):
    batch = images[start:start + batch_size]
    count = batch.shape[0]
    if count < batch_size:
      pad = np.zeros((batch_size - count,) + batch.shape[1:], np.uint8)
      batch = np.concatenate([batch, pad])
    out.append(np.asarray(_forward(graphdef, state, batch), np.float64)[:count])
  if not out:
    return np.zeros((0, FEATURE_DIM), np.float64)
  return np.concatenate(out)


# ---------------------------------------------------------------------------------------------
# PyTorch state dicts.

# (PyTorch name suffix, attribute path within BasicConv2d, OIHW->HWIO transpose?)
_CONV_ENTRIES = (("conv.weight", ("conv", "kernel"), True),
                 ("bn.weight", ("bn", "scale"), False),
                 ("bn.bias", ("bn", "bias"), False),
                 ("bn.running_mean", ("bn", "mean"), False),
                 ("bn.running_var", ("bn", "var"), False))


def _variables(model: InceptionV3) -> dict[str, tuple[nnx.Variable, bool]]:
  """PyTorch name -> (the module's variable, whether the PyTorch tensor is an OIHW conv)."""
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, BasicConv2d):
      prefix = ".".join(str(p) for p in path)
      for suffix, (module, attr), is_conv in _CONV_ENTRIES:
        out[f"{prefix}.{suffix}"] = (getattr(getattr(node, module), attr), is_conv)
  return out


def _torch_shape(shape: tuple[int, ...], is_conv: bool) -> tuple[int, ...]:
  if is_conv:
    h, w, i, o = shape
    return (o, i, h, w)
  return tuple(shape)


def state_dict(model: InceptionV3) -> dict[str, np.ndarray]:
  """The network's tensors as a PyTorch state dict (names and OIHW layout), without `fc`."""
  out = {}
  for name, (var, is_conv) in _variables(model).items():
    value = np.asarray(var.get_value())
    out[name] = np.transpose(value, (3, 2, 0, 1)) if is_conv else value
  return out


def _ignored(name: str) -> bool:
  return name.startswith(_IGNORED_PREFIXES) or name.endswith(_IGNORED_SUFFIXES)


def load_state_dict(model: InceptionV3, state: dict[str, Any]) -> None:
  """Loads a PyTorch state dict (pytorch-fid naming) into `model` in place.

  Conv weights are transposed OIHW -> HWIO. `fc.*` and `*.num_batches_tracked` entries are
  ignored. Nothing is changed unless every tensor matches: otherwise a ValueError lists all
  missing names, unexpected names and mis-shaped tensors at once.
  """
  targets = _variables(model)
  missing = sorted(name for name in targets if name not in state)
  unexpected = sorted(name for name in state if name not in targets and not _ignored(name))
  mis_shaped = []
  for name, (var, is_conv) in targets.items():
    if name in state:
      expected = _torch_shape(tuple(var.shape), is_conv)
      got = tuple(np.shape(state[name]))
      if got != expected:
        mis_shaped.append(f"{name} (expected {expected}, got {got})")
  if missing or unexpected or mis_shaped:
    parts = []
    if missing:
      parts.append(f"missing {len(missing)}: {', '.join(missing)}")
    if unexpected:
      parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected)}")
    if mis_shaped:
      parts.append(f"mis-shaped {len(mis_shaped)}: {', '.join(sorted(mis_shaped))}")
    raise ValueError("Inception state dict does not match the network; " + "; ".join(parts))
  for name, (var, is_conv) in targets.items():
    value = np.asarray(state[name], np.float32)
    if is_conv:
      value = np.transpose(value, (2, 3, 1, 0))
    var.set_value(jnp.asarray(value))


def _check_name_hash(path: str) -> None:
  """pytorch-fid's file names end in the first 8 hex digits of the file's SHA-256
  (`...-6726825d.pth`, as torch.hub checks them): a damaged download is refused here."""
  import hashlib  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel
  m = re.search(r"-([0-9a-f]{8})\.(pth|pt)$", os.path.basename(path))
  if not m:
    return
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  if not h.hexdigest().startswith(m.group(1)):
    raise ValueError(f"{path}: its SHA-256 begins {h.hexdigest()[:8]}, but its name says "
                     f"{m.group(1)}; the file is damaged or not the published one")


def load_weights(path: str | os.PathLike) -> InceptionV3:
  """A network with the weights of `path`: `.npz` (arrays keyed by state-dict name) or `.pth`/`.pt`.

  A `.pth` file is read with `torch.load(map_location="cpu", weights_only=True)`, so it needs
  torch. Without torch, convert it once to `.npz` where torch is available:

    python -c "import numpy as np, torch; sd = torch.load('pt_inception-2015-12-05-6726825d.pth',
    map_location='cpu'); np.savez('pt_inception-2015-12-05.npz',
    **{k: v.numpy() for k, v in sd.items()})"

  (one line; wrapped here).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Inception weights not found: {path}")
  _check_name_hash(path)
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    with np.load(path) as data:
      state = {k: data[k] for k in data.files}
  elif ext in (".pth", ".pt"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(
          f"reading {path} needs torch, which is not installed; convert the file to .npz where "
          "torch is available (see the docstring of patchdiff.inception.load_weights)") from e
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v.detach().cpu().numpy() for k, v in loaded.items() if hasattr(v, "numpy")}
  else:
    raise ValueError(f"unsupported Inception weight file {path}: expected .npz, .pth or .pt")
  model = create()
  load_state_dict(model, state)
  return model
