"""The networks are the official functions: parity with the PyTorch fixtures, exact sizes."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import ADM_TINY, DDPMPP_TINY, FIXTURES, state_dict_shapes
from patchdiff import convert, patches
from patchdiff.nn import edm, models, networks, torch_io


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def rel_l2(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def fixture(request, reference):
  name = request.param
  parity = reference / "parity"
  sd = convert.read_state_dict(str(parity / f"{name}_weights.npz"))
  denoiser = convert.load_torch_state_dict(sd, FIXTURES[name])
  with np.load(parity / f"{name}_io.npz") as f:
    io = {k: f[k] for k in f.files}
  return name, denoiser, io, sd


@pytest.mark.parametrize("size", [16, 8, 4])
def test_denoiser_matches_official(fixture, size):
  _, denoiser, io, _ = fixture
  labels = io.get(f"labels_{size}")
  x, sigma = nhwc(io[f"x_{size}"]), io[f"sigma_{size}"]
  out = denoiser(jnp.asarray(x), jnp.asarray(sigma), jnp.asarray(nhwc(io[f"pos_{size}"])),
                 None if labels is None else jnp.asarray(labels))
  assert out.shape == (3, size, size, 3)
  # D - c_skip x is only 2-6% of D, so the network's part, D - c_skip x = c_out F, is compared: it
  # matches to 2e-7..5e-7 (the float32 rounding of the stored D, seen through the subtraction).
  # Scaling map_layer1.weight by 1 + 1e-4 moves it to 2.6e-6..6.7e-6, and D to only 6e-8..4e-7.
  c_skip = edm.SIGMA_DATA ** 2 / (sigma.astype(np.float64) ** 2 + edm.SIGMA_DATA ** 2)
  skip = c_skip.reshape(-1, 1, 1, 1) * x
  assert rel_l2(np.asarray(out, np.float64) - skip, nhwc(io[f"D_{size}"]) - skip) < 1e-6


@pytest.mark.parametrize("size", [16, 8, 4])
def test_fixture_coordinates_follow_the_formula(fixture, size):
  _, _, io, _ = fixture
  pos = patches.coord_grid(io[f"offset_i_{size}"], io[f"offset_j_{size}"], size, 16)
  np.testing.assert_allclose(pos, nhwc(io[f"pos_{size}"]), atol=1e-6)


def test_parameter_counts_match_the_paper_configs():
  ddpmpp = dict(arch="ddpmpp", img_resolution=64, img_channels=3, channel_mult=(1, 2, 2, 2),
                dropout=0.05)
  adm = dict(arch="adm", img_resolution=32, img_channels=4, dropout=0.1)
  assert models.count_params(models.abstract_denoiser(ddpmpp)) == 61_806_723
  assert models.count_params(models.abstract_denoiser(dict(adm, label_dim=1000))) == 280_399_108
  assert models.count_params(models.abstract_denoiser(adm)) == 279_631_108


@pytest.mark.parametrize("cfg", [DDPMPP_TINY, ADM_TINY], ids=["ddpmpp", "adm"])
def test_an_abstract_build_is_the_eager_build_without_its_values(cfg):
  """The abstract build draws no initial values (`networks.building_abstractly`, for speed); the
  rest is the eagerly built network's: the graph, and every variable's path, shape, dtype and
  EDM init rule (which the trainer's init applies)."""
  abstract = models.abstract_denoiser(cfg)
  assert not networks.building_abstractly()
  eager = models._build(models.resolve(cfg), nnx.Rngs(0))  # pylint: disable=protected-access
  (a_graph, a_state), (e_graph, e_state) = nnx.split(abstract), nnx.split(eager)
  assert a_graph == e_graph
  described = lambda state: {  # noqa: E731
      path: (type(v).__name__, v.get_value().shape, v.get_value().dtype,
             v.get_metadata().get("init_spec"))
      for path, v in nnx.to_flat_state(state)}
  assert described(a_state) == described(e_state)
  assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct)
             for _, v in nnx.to_flat_state(a_state))
  # Eagerly, every variable with a random init rule is drawn (none left at zero).
  drawn = [v for _, v in nnx.to_flat_state(e_state)
           if v.get_metadata().get("init_spec", ("zeros",))[0] not in ("zeros", "ones")]
  assert drawn and all(float(jnp.abs(v.get_value()).max()) > 0 for v in drawn)


@pytest.mark.parametrize("txt,cfg", [
    ("ddpmpp_ffhq64_state_dict.txt", dict(arch="ddpmpp", img_resolution=64, img_channels=3,
                                          channel_mult=(1, 2, 2, 2))),
    ("adm_imagenet256_latent_cond_state_dict.txt", dict(arch="adm", img_resolution=32,
                                                        img_channels=4, label_dim=1000)),
])
def test_tensor_names_and_shapes_match_official_modules(reference, txt, cfg):
  expected = {k: v for k, v in state_dict_shapes(reference / txt).items()
              if not k.endswith("resample_filter")}
  ours = {name: v.shape for name, v in
          torch_io.state_dict(models.abstract_denoiser(cfg), models.TORCH_LAYERS).items()}
  assert ours == expected


def test_load_reports_unknown_missing_and_misshaped_tensors(reference):
  sd = convert.read_state_dict(str(reference / "parity" / "ddpmpp_tiny_weights.npz"))
  bad = dict(sd)
  del bad["model.map_layer0.bias"]
  bad["model.enc.extra.weight"] = np.zeros((2, 2), np.float32)
  bad["model.map_layer1.weight"] = np.zeros((3, 64), np.float32)
  with pytest.raises(ValueError) as e:
    convert.load_torch_state_dict(bad, DDPMPP_TINY)
  msg = str(e.value)
  assert "missing tensor model.map_layer0.bias (64,)" in msg
  assert "unexpected tensor model.enc.extra.weight (2, 2)" in msg
  assert "model.map_layer1.weight: expected shape (64, 64), got (3, 64)" in msg


def test_load_rejects_a_resample_filter_of_another_config(reference):
  sd = convert.read_state_dict(str(reference / "parity" / "ddpmpp_tiny_weights.npz"))
  with pytest.raises(ValueError, match="resample filter"):
    convert.load_torch_state_dict(sd, dict(DDPMPP_TINY, resample_filter=(1, 3, 3, 1)))


def test_attention_level_is_fixed_by_full_resolution():
  # In a 4 px patch of a 16 px model, the "8" attention level runs at 2x2 and still attends.
  d = models.create_denoiser(DDPMPP_TINY)
  blk = d.model.enc["8x8_block0"]
  assert blk.num_heads == 1
  x = jnp.ones((2, 4, 4, 5))
  out = d.model(x, jnp.zeros((2,)))
  assert out.shape == (2, 4, 4, 3)


def test_fresh_init_follows_edm_scheme():
  d = models.create_denoiser(dict(DDPMPP_TINY, model_channels=32), seed=1)
  w = np.asarray(d.model.enc["16x16_block0"].conv0.weight[...])  # xavier_uniform, 3x3 32->32
  bound = np.sqrt(6 / (32 * 9 + 32 * 9))
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
  out_w = np.asarray(d.model.dec["16x16_aux_conv"].weight[...])  # init_weight 1e-5
  assert 0 < np.abs(out_w).max() < 1e-5 * np.sqrt(6 / (32 * 9 + 3 * 9)) * 1.0001
  adm = models.create_denoiser(ADM_TINY)
  assert not np.any(np.asarray(adm.model.out_conv.weight[...]))  # ADM: zero-initialised output
  # Same seed, same weights; another seed, other weights.
  a = jax.tree_util.tree_leaves(nnx.state(models.create_denoiser(DDPMPP_TINY, seed=3)))
  b = jax.tree_util.tree_leaves(nnx.state(models.create_denoiser(DDPMPP_TINY, seed=3)))
  c = jax.tree_util.tree_leaves(nnx.state(models.create_denoiser(DDPMPP_TINY, seed=4)))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_label_dropout_zeroes_the_expected_fraction():
  labels = jnp.ones((20000, 5))
  dropped = networks._drop_labels(labels, 0.1, jax.random.key(0), train=True)
  rows_zero = np.mean(np.all(np.asarray(dropped) == 0, axis=1))
  assert abs(rows_zero - 0.1) < 0.01
  assert np.array_equal(networks._drop_labels(labels, 0.1, jax.random.key(0), train=False), labels)


def test_dropout_is_active_only_in_training():
  d = models.create_denoiser(dict(DDPMPP_TINY, dropout=0.5))
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  sigma = jnp.array([0.5, 1.0])
  pos = patches.coord_grid(np.zeros(2, np.int32), np.zeros(2, np.int32), 16, 16, xp=jnp)
  e1, e2 = d(x, sigma, pos), d(x, sigma, pos)
  np.testing.assert_array_equal(e1, e2)
  t1 = d(x, sigma, pos, train=True, key=jax.random.key(1))
  t2 = d(x, sigma, pos, train=True, key=jax.random.key(2))
  # Fresh output convs are scaled by 1e-5, so the difference is tiny but must be there.
  assert not np.array_equal(t1, t2)
  t3 = d(x, sigma, pos, train=True, key=jax.random.key(1))
  np.testing.assert_array_equal(t1, t3)  # the key alone decides the mask


def _within(observed, p, n, sigmas=5.0):
  """|observed - p| within `sigmas` standard errors of a fraction over n Bernoulli(p) draws."""
  return abs(observed - p) <= sigmas * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("rate", [0.05, 0.5])
def test_dropout_masks_have_the_rate_and_no_structure(rate):
  b, shape = 64, (16, 16, 32)
  keys = jax.random.split(jax.random.key(3), b)
  x = jnp.full((b, *shape), 2.0)
  y = np.asarray(networks.dropout(x, rate, keys, train=True))
  kept = y != 0
  np.testing.assert_array_equal(y[kept], np.float32(2.0) / np.float32(1.0 - rate))
  p = 1 - rate
  assert _within(kept.mean(), p, kept.size)
  # Neighbours along every axis, and two samples' masks, are independent: P(both) = p^2.
  for both in (kept[:, :, :, 1:] & kept[:, :, :, :-1], kept[:, 1:] & kept[:, :-1],
               kept[:, :, 1:] & kept[:, :, :-1], kept[1:] & kept[:-1]):
    assert _within(both.mean(), p * p, both.size)
  # The high bits of the hash are uniform (16 bins; 5 standard errors each).
  top = np.asarray(networks.hashed_bits(keys, (b, *shape))) >> 28
  counts = np.bincount(top.ravel(), minlength=16) / top.size
  assert all(_within(c, 1 / 16, top.size) for c in counts)


def test_dropout_masks_follow_the_sample_key_alone():
  keys = jax.random.split(jax.random.key(5), 6)
  x = jnp.ones((6, 8, 8, 16))
  batch = np.asarray(networks.dropout(x, 0.3, keys, train=True))
  for i in (0, 4):  # a sample's mask, computed in a batch of one, is its mask in the batch
    alone = networks.dropout(x[i:i + 1], 0.3, keys[i:i + 1], train=True)
    np.testing.assert_array_equal(alone[0], batch[i])
  one_key = np.asarray(networks.dropout(x, 0.3, keys[0], train=True))
  np.testing.assert_array_equal(one_key, networks.dropout(x, 0.3, keys[0], train=True))
  assert not np.array_equal(one_key[0], one_key[1])  # one key: a counter over the whole batch
  with pytest.raises(TypeError, match="typed keys"):
    networks.hashed_bits(jnp.zeros(2, jnp.uint32), (2, 3))
  with pytest.raises(ValueError, match=r"keys of shape \(6,\) for an array of \(5, 3\)"):
    networks.hashed_bits(keys, (5, 3))
  with pytest.raises(ValueError, match="dropout rate 1.0"):
    networks.dropout(x, 1.0, keys, train=True)


def _group_norm_autodiff(x, num_groups, weight, bias, eps):
  """The forward formula alone, for JAX to differentiate."""
  b, h, w, c = x.shape
  xg = x.astype(jnp.float32).reshape(b, h, w, num_groups, c // num_groups)
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
  xg = (xg - mean) * jax.lax.rsqrt(var + eps)
  return (xg.reshape(b, h, w, c) * weight + bias).astype(x.dtype)


@pytest.mark.parametrize("dtype,groups", [(jnp.float32, 8), (jnp.float32, 32),
                                          (jnp.bfloat16, 8)])
def test_group_norm_gradient_matches_autodiff(dtype, groups):
  k = jax.random.split(jax.random.key(7), 4)
  x = (jax.random.normal(k[0], (3, 8, 8, 64)) * 3 + 1).astype(dtype)
  weight, bias = jax.random.normal(k[1], (64,)), jax.random.normal(k[2], (64,))
  ct = jax.random.normal(k[3], x.shape).astype(dtype)
  outs = []
  for fn in (networks.group_norm, _group_norm_autodiff):
    y, vjp = jax.vjp(lambda x, w, b, fn=fn: fn(x, groups, w, b, 1e-5), x, weight, bias)
    outs.append((y, *vjp(ct)))
  for got, want in zip(*outs):
    assert got.dtype == want.dtype and got.shape == want.shape
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), np.abs(got - want).max()


def test_ncsnpp_variant_builds_and_runs():
  cfg = dict(arch="ncsnpp", img_resolution=16, img_channels=3, model_channels=16,
             channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0)
  d = models.create_denoiser(cfg)
  assert "8x8_aux_residual" in d.model.enc_names
  assert d.model.map_noise.freqs.shape == (16,)  # Fourier, channel_mult_noise 2: 32 / 2
  zeros = np.zeros(2, np.int32)
  out = d(jnp.zeros((2, 8, 8, 3)), jnp.ones((2,)), patches.coord_grid(zeros, zeros, 8, 8, xp=jnp))
  assert out.shape == (2, 8, 8, 3) and np.all(np.isfinite(out))


def test_resampling_matches_explicit_convolutions():
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 2))
  # [1,1]: average pooling and nearest upsampling.
  np.testing.assert_allclose(networks.downsample(x, (1, 1)),
                             x.reshape(1, 4, 2, 4, 2, 2).mean((2, 4)), atol=1e-6)
  np.testing.assert_allclose(networks.upsample(x, (1, 1))[:, ::2, ::2], x, atol=1e-6)
  # [1,3,3,1]: a filtered resample keeps a constant image constant away from the border.
  ones = jnp.ones((1, 8, 8, 1))
  np.testing.assert_allclose(networks.downsample(ones, (1, 3, 3, 1))[:, 1:-1, 1:-1], 1, atol=1e-6)
  np.testing.assert_allclose(networks.upsample(ones, (1, 3, 3, 1))[:, 2:-2, 2:-2], 1, atol=1e-6)
  assert networks.upsample(ones, (1, 3, 3, 1)).shape == (1, 16, 16, 1)
