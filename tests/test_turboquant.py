"""TurboQuant: codebooks against tables of Lloyd-Max codebooks, Monte-Carlo distortions against
the exact formulas (tolerances from the standard errors), codes-only attention, packed sizes,
errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax.quant import turboquant as tq

D = 64  # GPT-2's head dim

# sqrt(d) * positive centroids of the Lloyd-Max codebook for a rotated unit vector's coordinate
# (TurboQuant, arXiv:2504.19874, Lemma 1 and §3.1), d = 64; computed independently in float64.
TABLE_B_64 = {
    1: [0.801007],
    2: [0.452119, 1.499975],
    3: [0.243753, 0.750658, 1.329343, 2.111311],
    4: [0.127352, 0.384718, 0.650494, 0.931894, 1.239404, 1.590849, 2.023310, 2.646370],
}
# Lloyd-Max for N(0, 1) (Max, 1960), the d -> infinity limit of sqrt(d) * centroids.
TABLE_A = {
    1: ([0.797885], 0.363380),
    2: ([0.452780, 1.510418], 0.117482),
    3: ([0.245094, 0.756005, 1.343909, 2.151946], 0.034548),
    4: ([0.128395, 0.388048, 0.656759, 0.942340, 1.256231, 1.618046, 2.069017, 2.732590],
        0.009501),
}
# D_mse = d * C(f_d, b) of those codebooks, to 5 decimals (Theorem 1: ~0.36, 0.117, 0.03, 0.009).
TABLE_C = {
    16: [0.34319, 0.10585, 0.03008, 0.00809],
    64: [0.35839, 0.11453, 0.03339, 0.00913],
    128: [0.36089, 0.11600, 0.03397, 0.00931],
}


def _unit(key, shape):
    x = jax.random.normal(key, shape)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@jax.jit
def _round_trip(quantizer, x):
    return quantizer.dequantize(quantizer.quantize(x))


def _keys_axis(tree):
    """Codes of N vectors -> codes of N rows of one key each (batch [N, T=1])."""
    return jax.tree_util.tree_map(lambda a: a[:, None], tree)


def _query_axis(tree):
    """Prepared queries [N, d] -> [N, Q=1, d]."""
    return jax.tree_util.tree_map(lambda a: a[:, None, :], tree)


def _paired_scores(quantizer, y_ND, codes_N):
    """<y_n, x~_n> for each n, from the codes."""
    prepared = _query_axis(quantizer.prepare_query(y_ND))
    return quantizer.scores(prepared, _keys_axis(codes_N))[:, 0, 0]


# ---------------------------------------------------------------------------------------------
# Codebooks


@pytest.mark.parametrize("bits", tq.BITS)
def test_codebook_d64_matches_table_b(bits):
    centroids, boundaries = tq.codebook(D, bits)
    assert centroids.dtype == np.float64 and centroids.shape == (2**bits,)
    np.testing.assert_allclose(centroids, -centroids[::-1], atol=1e-15)  # symmetric
    np.testing.assert_allclose(centroids[2 ** (bits - 1):] * math.sqrt(D), TABLE_B_64[bits],
                               atol=1e-5)
    np.testing.assert_array_equal(boundaries, (centroids[1:] + centroids[:-1]) / 2)
    assert tq.codebook(D, bits) is tq.codebook(D, bits)  # computed once


@pytest.mark.parametrize("bits", tq.BITS)
def test_codebook_tends_to_gaussian_lloyd_max(bits):
    # Table B moves by ~1/d toward Table A (d=768 is still 7e-3 off at b=4); at d=2^14 the
    # remaining gaps are ~4e-4 in the centroids and ~2e-5 in the MSE.
    d = 2**14
    centroids, expected_mse = TABLE_A[bits]
    np.testing.assert_allclose(tq.codebook(d, bits).centroids[2 ** (bits - 1):] * math.sqrt(d),
                               centroids, atol=1e-3)
    assert tq.mse_distortion(d, bits) == pytest.approx(expected_mse, abs=5e-5)


@pytest.mark.parametrize("d", sorted(TABLE_C))
def test_distortion_identity_and_table_c(d):
    for bits in tq.BITS:
        identity = tq.mse_distortion(d, bits)
        assert identity == pytest.approx(tq.mse_distortion(d, bits, "integral"), abs=1e-10)
        assert identity == pytest.approx(TABLE_C[d][bits - 1], abs=1e-5)  # table rounding 5e-6
    assert tq.mse_distortion(d, 0) == pytest.approx(1.0, abs=1e-12)  # prod's empty stage


# ---------------------------------------------------------------------------------------------
# Monte-Carlo distortion and inner products


@pytest.mark.parametrize("bits", tq.BITS)
def test_mc_mse_distortion_matches_table_c_and_bounds(bits):
    # For any fixed Pi, Pi u is uniform on the sphere when u is: one rotation and N random
    # vectors sample D_mse exactly. Per-vector errors have ~20% relative spread, so the
    # standard error at N=20k is ~0.15%: 5 SE is far inside the 3% the issue asks for.
    n = 20_000
    q = tq.TurboQuantMSE.create(D, bits, seed=11)
    x = _unit(jax.random.key(bits), (n, D))
    x_hat = _round_trip(q, x)
    err = np.asarray(jnp.sum((x - x_hat) ** 2, axis=-1), np.float64)
    mean, se = err.mean(), err.std() / math.sqrt(n)
    assert abs(mean - TABLE_C[D][bits - 1]) < 0.03 * TABLE_C[D][bits - 1]
    assert abs(mean - tq.mse_distortion(D, bits)) < 5 * se
    assert 4.0**-bits < mean < math.sqrt(3) * math.pi / 2 * 4.0**-bits
    # The reconstruction is shrunk: E||x~||^2 = E<x, x~> = 1 - D_mse (arXiv:2504.19874 §3.2). At b=1
    # ||x~||^2 = d c^2 for every vector: no spread, only float32 rounding.
    for stat in (jnp.sum(x_hat**2, -1), jnp.sum(x * x_hat, -1)):
        stat = np.asarray(stat, np.float64)
        tol = 5 * stat.std() / math.sqrt(n) + 1e-6
        assert abs(stat.mean() - (1 - tq.mse_distortion(D, bits))) < tol


def _over_draws(kind, bits, x_ND, y_RND, seeds):
    """Errors <y, x~> - <y, x> [R, N], draw r with the (Pi, S) of seeds[r] and queries y[r]."""
    base = tq.make_quantizer(bits, D, kind=kind)
    rotations = jnp.stack([tq.haar_rotation(s, D) for s in seeds])
    projections = jnp.stack([tq.qjl_matrix(s, D) for s in seeds])

    def errors(rotation, projection, y_ND):
        if kind == "mse":
            q = base.replace(rotation=rotation)
        else:
            q = base.replace(mse=base.mse.replace(rotation=rotation), projection=projection)
        return _paired_scores(q, y_ND, q.quantize(x_ND)) - jnp.sum(x_ND * y_ND, -1)

    y_RND = jnp.broadcast_to(y_RND, (len(seeds), *x_ND.shape))
    return np.asarray(jax.jit(jax.vmap(errors))(rotations, projections, y_RND), np.float64)


RHO = 0.6  # <x, y> of the fixed pairs


@pytest.fixture(scope="module")
def fixed_pairs():
    """8 fixed unit x with unit y at <x, y> = RHO: Theorem 2 is over the quantizer's
    randomness for FIXED inputs (random pairs would make any odd estimator look unbiased)."""
    x = _unit(jax.random.key(20), (8, D))
    z = _unit(jax.random.key(21), (8, D))
    z = z - jnp.sum(z * x, -1, keepdims=True) * x
    y = RHO * x + math.sqrt(1 - RHO**2) * z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    return x, y


@pytest.mark.parametrize("bits", tq.BITS)
def test_prod_unbiased_and_mse_slope_for_fixed_inputs(fixed_pairs, bits):
    # 400 draws of (Pi, S); the 8 pairs of a draw share it, so the SE comes from draw means.
    x, y = fixed_pairs
    n_draws = 400
    for kind in ("prod", "mse"):
        per_draw = _over_draws(kind, bits, x, y, range(n_draws)).mean(axis=1)
        mean, se = per_draw.mean(), per_draw.std() / math.sqrt(n_draws)
        if kind == "prod":
            assert abs(mean) < 3 * se
        else:
            # E<y, x~> = (1 - D_mse) <y, x>: the MSE quantizer is biased, and the test sees it.
            slope = 1 + mean / RHO
            assert slope == pytest.approx(1 - tq.mse_distortion(D, bits), abs=4 * se / RHO)
            assert abs(mean) > 10 * se


@pytest.mark.parametrize("bits", tq.BITS)
def test_prod_variance_matches_exact_formula(bits):
    # Given the MSE stage, the QJL term has variance (1/d)(pi/2 gamma^2 ||y||^2 - <r, y>^2)
    # and mean <y, r> (arXiv:2504.19874, Lemma 4), so the total is its average. For y uniform
    # and independent of x, E<r, y>^2 = E gamma^2 / d and E gamma^2 = D_mse(b-1), hence
    #   d * D_prod = D_mse(b-1) (pi/2 - 1/d)   (1.555, 0.557, 0.178, 0.0519 at d=64),
    # just under an independent Monte-Carlo estimate (1.565, 0.564, 0.177, 0.051) and the bound
    # pi/2 D_mse(b-1).
    # 16 draws of (Pi, S) x 1250 random pairs: the relative SE of the variance is ~1.5%
    # (measured spread over draws ~6%), so 10% is > 6 SE.
    n_draws, n = 16, 1250
    x = _unit(jax.random.key(30), (n, D))
    y = _unit(jax.random.key(31), (n_draws, n, D))
    err = _over_draws("prod", bits, x, y, [(7, s) for s in range(n_draws)])
    expected = tq.mse_distortion(D, bits - 1) * (math.pi / 2 - 1 / D)
    assert D * err.var() == pytest.approx(expected, rel=0.10)


# ---------------------------------------------------------------------------------------------
# Attention from the codes


def _quantizers():
    return {
        "mse3": tq.make_quantizer(3, D, kind="mse", seed=1),
        "prod3": tq.make_quantizer(3, D, kind="prod", seed=1),
        "prod1": tq.make_quantizer(1, D, kind="prod", seed=1),
        "mse3_unbiased": tq.make_quantizer(3, D, kind="mse", seed=1, unbiased=True),
        "split": tq.make_quantizer(tq.OutlierSplit(16, 3, 2), D, kind="prod", seed=1,
                                   perm=jax.random.permutation(jax.random.key(5), D)),
    }


@pytest.mark.parametrize("name", ["mse3", "prod3", "prod1", "mse3_unbiased", "split"])
def test_scores_and_weighted_sum_from_codes_equal_dequantized(name):
    quantizer = _quantizers()[name]
    k = jax.random.split(jax.random.key(40), 4)
    x_BTD = jax.random.normal(k[0], (2, 50, D)) * jnp.exp(jax.random.normal(k[1], (2, 50, 1)))
    q_BQD = jax.random.normal(k[2], (2, 3, D)) * 4
    w_BQT = jax.nn.softmax(jax.random.normal(k[3], (2, 3, 50)) * 3, axis=-1)

    @jax.jit
    def run(quantizer, x, q, w):
        codes = quantizer.quantize(x)
        x_hat = quantizer.dequantize(codes)
        return (quantizer.scores(quantizer.prepare_query(q), codes),
                jnp.einsum("bqd,btd->bqt", q, x_hat, precision="highest"),
                quantizer.weighted_sum(w, codes),
                jnp.einsum("bqt,btd->bqd", w, x_hat, precision="highest"))

    scores, scores_ref, out, out_ref = run(quantizer, x_BTD, q_BQD, w_BQT)
    np.testing.assert_allclose(scores, scores_ref, atol=2e-6 * float(jnp.max(jnp.abs(scores_ref))))
    np.testing.assert_allclose(out, out_ref, atol=2e-6 * float(jnp.max(jnp.abs(out_ref))))


@pytest.mark.parametrize("bits", [1, 3])
def test_unbiased_scale_keeps_the_projection_on_x_and_undoes_the_shrink(bits):
    k = jax.random.split(jax.random.key(41), 2)
    x = jax.random.normal(k[0], (4000, D)) * 3
    y = jax.random.normal(k[1], (4000, D))
    plain, unbiased = (tq.make_quantizer(bits, D, unbiased=u) for u in (False, True))
    # <x, x~> = ||x||^2 per vector, up to the float16 rounding of the stored scale
    x_hat = _round_trip(unbiased, x)
    np.testing.assert_allclose(jnp.sum(x * x_hat, -1), jnp.sum(x * x, -1), rtol=2e-3)

    def slope(quantizer):  # least squares <y, x~> ~ s <y, x> over the pairs
        exact, approx = jnp.sum(y * x, -1), jnp.sum(y * _round_trip(quantizer, x), -1)
        return float(jnp.sum(exact * approx) / jnp.sum(exact * exact))

    shrink = 1 - tq.mse_distortion(D, bits)  # E[x~] = (1 - D_mse) x: 0.64 at 1 bit, 0.97 at 3
    assert slope(plain) == pytest.approx(shrink, abs=0.03)
    assert abs(slope(unbiased) - 1) < abs(slope(plain) - 1) / 2


def test_quarter_split_is_the_papers_recipe():
    assert tq.quarter_split(2, 64) == tq.OutlierSplit(16, 3, 2)
    assert tq.quarter_split(3, 128) == tq.OutlierSplit(32, 4, 3)
    assert tq.bits_per_value(tq.quarter_split(2, 128), 128) == 2.5  # the paper's "2.5 bits"


def test_zero_vector_and_bfloat16_input():
    q = tq.make_quantizer(2, D)
    x = jnp.zeros((3, D)).at[1].set(1.0).astype(jnp.bfloat16)
    x_hat = _round_trip(q, x)
    assert not bool(jnp.any(jnp.isnan(x_hat)))
    np.testing.assert_array_equal(x_hat[0], 0.0)


# ---------------------------------------------------------------------------------------------
# Packing and bytes


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [64, 13])
def test_pack_round_trip(bits, n):
    values = jax.random.randint(jax.random.key(bits * n), (3, 5, n), 0, 2**bits).astype(jnp.uint8)
    packed = tq.pack_bits(values, bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 5, tq.packed_size(n, bits))
    np.testing.assert_array_equal(tq.unpack_bits(packed, bits, n), values)


def test_pack_layout_is_little_endian_groups_of_eight():
    # word = sum_k v_k << 3k = 2054353 = 0x1F58D1 -> bytes D1 58 1F
    np.testing.assert_array_equal(tq.pack_bits(jnp.arange(1, 9) % 8, 3), [0xD1, 0x58, 0x1F])


def test_b3_codes_are_under_a_4_5th_of_float16():
    n = 1000
    x = jax.random.normal(jax.random.key(50), (n, D)) * 12
    codes = tq.make_quantizer(3, D).quantize(x)
    assert codes.idx.dtype == jnp.uint8 and codes.norm.dtype == jnp.float16
    ratio = tq.nbytes(codes) / x.astype(jnp.float16).nbytes
    assert ratio == pytest.approx(26 / 128)  # 24 code bytes + a float16 norm per 128 bytes
    assert ratio <= 1 / 4.5


@pytest.mark.parametrize("kind", tq.KEY_QUANTIZERS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, tq.OutlierSplit(16, 3, 2), tq.OutlierSplit(20, 4, 1)])
@pytest.mark.parametrize("norm_dtype", tq.NORM_DTYPES)
def test_measured_bytes_equal_bits_per_value(kind, bits, norm_dtype):
    n = 10
    codes = jax.eval_shape(tq.make_quantizer(bits, D, kind=kind, norm_dtype=norm_dtype).quantize,
                           jax.ShapeDtypeStruct((n, D), jnp.float32))
    norm_bits = 16 if norm_dtype == "float16" else 32
    assert 8 * tq.nbytes(codes) / (n * D) == tq.bits_per_value(bits, D, kind=kind,
                                                               norm_bits=norm_bits)


def test_bits_accounting_of_specs_table():
    bpv = tq.bits_per_value
    assert [bpv(b, 64) for b in (2, 3, 4)] == [2.25, 3.25, 4.25]
    assert [bpv(b, 64, kind="prod") for b in (3, 4)] == [3.5, 4.5]
    assert bpv(3, 64, include_norms=False) == bpv(3, 64, kind="prod", include_norms=False) == 3
    assert bpv(3, 64, norm_bits=32) == 3.5
    # d=64: the paper's quarter-at-b+1 recipe vs the payload-exact "2.5" / "3.5" splits.
    assert bpv(tq.OutlierSplit(16, 3, 2), 64, include_norms=False) == 2.25
    assert bpv(tq.OutlierSplit(16, 3, 2), 64) == 2.75
    assert bpv(tq.OutlierSplit(16, 4, 3), 64) == 3.75
    assert tq.split_for_rate(2.5, 64) == tq.OutlierSplit(32, 3, 2)
    assert tq.split_for_rate(3.5, 64) == tq.OutlierSplit(32, 4, 3)
    assert bpv(tq.split_for_rate(2.5, 64), 64, include_norms=False) == 2.5
    assert bpv(tq.split_for_rate(2.5, 64), 64) == 3.0
    # d=128: the paper's 32@3 + 96@2 is 2.25 bits of codes, 2.5 only with its two fp16 norms.
    assert bpv(tq.OutlierSplit(32, 3, 2), 128, include_norms=False) == 2.25
    assert bpv(tq.OutlierSplit(32, 3, 2), 128) == 2.5
    assert bpv(tq.OutlierSplit(32, 4, 3), 128) == 3.5


# ---------------------------------------------------------------------------------------------
# Outlier split


def test_split_beats_uniform_bits_when_outliers_carry_the_energy():
    n = 4000
    k = jax.random.split(jax.random.key(60), 3)
    hot = jax.random.permutation(k[0], D)[:16]
    scale = jnp.ones(D).at[hot].set(8.0)  # 16 channels carry 1024/1072 = 96% of the energy
    calib = jax.random.normal(k[1], (500, D)) * scale
    x = jax.random.normal(k[2], (n, D)) * scale
    perm = tq.outlier_permutation(calib)
    assert set(np.asarray(perm[:16]).tolist()) == set(np.asarray(hot).tolist())

    def rel_mse(quantizer):
        x_hat = _round_trip(quantizer, x)
        return float(jnp.mean(jnp.sum((x - x_hat) ** 2, -1) / jnp.sum(x**2, -1)))

    split = rel_mse(tq.make_quantizer(tq.OutlierSplit(16, 3, 2), D).replace(perm=perm))
    uniform2 = rel_mse(tq.make_quantizer(2, D))
    # Each part is an independent instance on its own unit vector (arXiv:2504.19874 §4).
    share = float(jnp.mean(jnp.sum(x[:, hot] ** 2, -1) / jnp.sum(x**2, -1)))
    predicted = share * tq.mse_distortion(16, 3) + (1 - share) * tq.mse_distortion(48, 2)
    assert split == pytest.approx(predicted, rel=0.05)  # SE ~0.5% at n=4000
    assert split < uniform2 / 3


def test_split_per_head_permutations_broadcast():
    split = tq.OutlierSplit(16, 2, 1)
    perms = jnp.stack([jax.random.permutation(jax.random.key(h), D) for h in range(2)])
    x_HTD = jax.random.normal(jax.random.key(70), (2, 5, D))
    per_head = tq.make_quantizer(split, D, perm=perms[:, None, :])
    x_hat = _round_trip(per_head, x_HTD)
    for h in range(2):
        alone = tq.make_quantizer(split, D, perm=perms[h])
        np.testing.assert_allclose(x_hat[h], _round_trip(alone, x_HTD[h]), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Determinism and configuration


def test_rotation_is_a_function_of_seed_and_dim():
    r = tq.haar_rotation(0, D)
    np.testing.assert_array_equal(r, tq.haar_rotation(0, D))
    np.testing.assert_allclose(r @ r.T, np.eye(D), atol=2e-6)
    assert not np.allclose(r, tq.haar_rotation(1, D), atol=0.1)
    assert not np.allclose(r, tq.haar_rotation((0, 1), D), atol=0.1)
    s = tq.qjl_matrix(0, D)
    np.testing.assert_array_equal(s, tq.qjl_matrix(0, D))
    assert abs(float(np.mean(s**2)) - 1) < 0.05 and not np.allclose(s, tq.qjl_matrix(1, D))
    keys, values = tq.TurboQuantConfig().make_quantizers(D, stream=(3,))
    keys_again, _ = tq.TurboQuantConfig().make_quantizers(D, stream=(3,))
    other_layer, _ = tq.TurboQuantConfig().make_quantizers(D, stream=(4,))
    np.testing.assert_array_equal(keys.rotation, keys_again.rotation)
    assert not np.allclose(keys.rotation, values.rotation, atol=0.1)
    assert not np.allclose(keys.rotation, other_layer.rotation, atol=0.1)


def test_config_specs():
    config = tq.TurboQuantConfig(bits=2, key_quantizer="prod", outlier=tq.OutlierSplit(16, 3, 2))
    keys, values = config.make_quantizers(D)
    assert isinstance(keys, tq.TurboQuantSplit) and isinstance(keys.outlier, tq.TurboQuantProd)
    assert isinstance(values, tq.TurboQuantSplit) and isinstance(values.regular, tq.TurboQuantMSE)
    _, values = tq.TurboQuantConfig(bits=4, value_bits=2).make_quantizers(D)
    assert isinstance(values, tq.TurboQuantMSE) and values.bits == 2


@pytest.mark.parametrize("make, match", [
    (lambda: tq.TurboQuantMSE.create(D, 0), r"bits=0 is invalid: use an integer in 1\.\.4"),
    (lambda: tq.TurboQuantProd.create(D, 5), r"bits=5 is invalid"),
    (lambda: tq.TurboQuantMSE.create(D, 2.5), r"bits=2\.5 is invalid.*OutlierSplit"),
    (lambda: tq.TurboQuantMSE.create(D, True), r"bits=True is invalid"),
    (lambda: tq.TurboQuantMSE.create(1, 2), r"d=1 is invalid: .* >= 2"),
    (lambda: tq.TurboQuantMSE.create(D, 2, norm_dtype="bfloat16"), r"norm_dtype='bfloat16'"),
    (lambda: tq.TurboQuantMSE.create(D, 2).quantize(jnp.ones((3, 32))), r"dim 32 .* d=64"),
    (lambda: tq.make_quantizer(2, D, kind="qjl"), r"kind='qjl' is invalid"),
    (lambda: tq.make_quantizer(2, D, perm=jnp.arange(D)), r"perm is given but bits=2"),
    (lambda: tq.make_quantizer(tq.OutlierSplit(64, 3, 2), D),
     r"n_outlier=64 does not fit head dim d=64: .* use n_outlier <= 62"),
    (lambda: tq.make_quantizer(tq.OutlierSplit(80, 3, 2), D), r"n_outlier=80 does not fit"),
    (lambda: tq.make_quantizer(tq.OutlierSplit(14, 3, 2), 15), r"d=15: .*n_outlier <= 13"),
    (lambda: tq.make_quantizer(tq.OutlierSplit(16, 3, 2), D, perm=jnp.arange(32)),
     r"perm has 32 channels"),
    (lambda: tq.OutlierSplit(1, 3, 2), r"n_outlier=1 is invalid"),
    (lambda: tq.OutlierSplit(16, 5, 2), r"bits_outlier=5 is invalid"),
    (lambda: tq.OutlierSplit(16, 3, 0), r"bits_regular=0 is invalid"),
    (lambda: tq.bits_per_value(3, D, norm_bits=8), r"norm_bits=8 is invalid"),
    (lambda: tq.split_for_rate(3, D), r"rate=3 at d=64 is not a split"),
    (lambda: tq.split_for_rate(2.3, D), r"rate=2\.3"),
    (lambda: tq.split_for_rate(4.5, D), r"rate=4\.5"),
    (lambda: tq.haar_rotation(-1, D), r"seed=-1 is invalid"),
    (lambda: tq.mse_distortion(D, 2, "mc"), r"method='mc'"),
    (lambda: tq.TurboQuantConfig(bits=0), r"bits=0 is invalid"),
    (lambda: tq.TurboQuantConfig(key_quantizer="qjl"), r"key_quantizer='qjl' is invalid"),
    (lambda: tq.TurboQuantConfig(value_bits=5), r"value_bits=5 is invalid"),
    (lambda: tq.TurboQuantConfig(window=-1), r"window=-1 is invalid"),
    (lambda: tq.TurboQuantConfig(outlier_select="rms"), r"outlier_select='rms' is invalid"),
    (lambda: tq.TurboQuantConfig(unbiased=1), r"unbiased=1 is invalid"),
    (lambda: tq.quarter_split(4, D), r"bits=4 has no wider split"),
    (lambda: tq.TurboQuantConfig(seed=-2), r"seed=-2 is invalid"),
    (lambda: tq.TurboQuantConfig(outlier=(16, 3, 2)), r"outlier=\(16, 3, 2\) is invalid"),
    (lambda: tq.TurboQuantConfig(bits=3, outlier=tq.OutlierSplit(16, 3, 2)),
     r"bits=3 conflicts with outlier.bits_regular=2"),
    (lambda: tq.TurboQuantConfig(bits=2, outlier=tq.OutlierSplit(16, 3, 2)).check(17),
     r"n_outlier=16 does not fit head dim d=17"),
])
def test_bad_configs_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
