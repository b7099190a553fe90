"""TurboQuant (Zandieh et al., arXiv:2504.19874): b-bit vector quantization for a KV cache.

A vector x [..., d] is stored as its norm (float16 by default) and the b-bit indices of the
coordinates of the rotated unit vector `Pi x / ||x||`, each coordinate quantized with the
Lloyd-Max codebook of the exact density of one coordinate of a uniform point on the sphere
(Lemma 1, Algorithm 1: `TurboQuantMSE`). `TurboQuantProd` spends one of its b bits per
coordinate on the signs of a Gaussian projection of the residual (QJL, Definition 1) plus the
residual norm gamma, which makes inner products unbiased (Algorithm 2, Theorem 2). Attention
never reconstructs a stored vector: the query is rotated (and projected) once, scores are dot
products with codebook entries in the rotated space, and values are summed in the rotated
space and rotated back once.

Choices (the paper leaves them open):

- One rotation Pi (and one QJL matrix S) per quantizer instance, a pure function of
  (seed, d): numpy's PCG64 seeded by the seed, d and the matrix's role. The caller picks the
  granularity through `seed`, which may be a tuple such as `(seed, layer)`.
- QJL acts on the residual in the rotated space, `sign(S (Pi u - c[idx]))`. `S Pi` is i.i.d.
  Gaussian and independent of Pi, so this is Algorithm 2 with the projection `S Pi`, and it
  saves one d x d product per stored vector and per query.
- Norms and gamma are stored in float16 (or float32): GPT-2's key norms are ~12, far inside
  float16's range, and its 2^-11 relative rounding adds ~1e-7 to a distortion of >= 4e-3.
- Packing: groups of 8 indices of b bits become b bytes, little-endian (index k of a group in
  bits [b*k, b*k + b) of the group's 8b-bit word); d is zero-padded to a multiple of 8.
  QJL signs are the b = 1 case (bit 1 = non-negative).
- Fractional rates split the ORIGINAL channels (§1.9): `OutlierSplit(n_outlier,
  bits_outlier, bits_regular)` runs two independent instances (own rotation, codebook on
  D_|O| or D_|R|, norms). `bits_per_value` counts the stored bits per coordinate with and
  without the per-instance floats. The rate label names the payload (code bits only, the
  paper's printed formula): `split_for_rate(2.5, 64)` is 32@3 + 32@2 (2.5 payload, 3.0 with
  two float16 norms); the paper's recipe "a quarter of the channels at b+1 bits" is 16@3 +
  48@2 at d = 64 (2.25 payload, 2.75 with norms), and at d = 128 its 32@3 + 96@2 is 2.25
  payload, 2.5 only when the two norms are counted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from scipy import integrate, special

BITS = (1, 2, 3, 4)
KEY_QUANTIZERS = ("mse", "prod")
NORM_DTYPES = ("float16", "float32")
# which channels an OutlierSplit widens: the prompt's highest-RMS channels per (sequence,
# layer, head) or per (sequence, layer), or channels 0..n-1 (no selection, for comparison)
OUTLIER_SELECT = ("head", "layer", "first")
MIN_DIM = 2  # the coordinate density C_d (1 - t^2)^((d-3)/2) is a density only for d >= 2
QJL_SCALE = math.sqrt(math.pi / 2)  # Q_qjl^{-1}(z) = QJL_SCALE / d * S^T z (Definition 1)
_HI = jax.lax.Precision.HIGHEST  # keep rotations in full float32 on accelerators too
_LLOYD_TOL = 1e-12  # max movement of sqrt(d) * centroid between Lloyd steps
_LLOYD_MAX_STEPS = 100_000
_ROTATION, _PROJECTION = 0, 1  # the two random matrices of one seed draw independent streams

Seed = int | tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# Validation


def _check_int(value, name: str, allowed, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: {fix}")
    return int(value)


def _check_bits(bits, name: str = "bits") -> int:
    return _check_int(
        bits, name, BITS,
        "use an integer in 1..4 (fractional rates come from an OutlierSplit of the channels)",
    )


def _check_dim(d) -> int:
    return _check_int(
        d, "d", range(MIN_DIM, 1 << 30), f"the vector dimension must be an integer >= {MIN_DIM}"
    )


def _check_norm_dtype(norm_dtype: str) -> str:
    if norm_dtype not in NORM_DTYPES:
        raise ValueError(f"norm_dtype={norm_dtype!r} is invalid: choose one of {NORM_DTYPES}")
    return norm_dtype


def _seed_tuple(seed: Seed) -> tuple[int, ...]:
    parts = (seed,) if isinstance(seed, (int, np.integer)) else tuple(seed)
    if not parts or any(
        isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in parts
    ):
        raise ValueError(
            f"seed={seed!r} is invalid: use a non-negative int or a tuple of them, "
            f"e.g. (seed, layer)"
        )
    return tuple(int(s) for s in parts)


# ---------------------------------------------------------------------------------------------
# Lloyd-Max codebooks on the exact coordinate density (Lemma 1, Theorem 1), float64 numpy


def _log_c(d: int) -> float:
    """log C_d, C_d = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2))."""
    return special.gammaln(d / 2) - special.gammaln((d - 1) / 2) - 0.5 * math.log(math.pi)


def coordinate_density(t, d: int):
    """f_d(t) = C_d (1 - t^2)^((d-3)/2): one coordinate of a uniform point on S^{d-1}."""
    t = np.asarray(t, np.float64)
    return math.exp(_log_c(d)) * (1 - t * t) ** ((d - 3) / 2)


def coordinate_cdf(t, d: int):
    """F_d(t) = I_{(1+t)/2}((d-1)/2, (d-1)/2)."""
    a = (d - 1) / 2
    return special.betainc(a, a, (1 + np.asarray(t, np.float64)) / 2)


def _partial_mean(t, d: int):
    """M1_d(t) = integral_{-1}^t s f_d(s) ds = -C_d (1 - t^2)^((d-1)/2) / (d-1)."""
    t = np.asarray(t, np.float64)
    return -math.exp(_log_c(d)) * (1 - t * t) ** ((d - 1) / 2) / (d - 1)


def _cell_means(edges, d: int):
    """Conditional means of the cells [edges[i], edges[i+1]]: the centroid condition."""
    return np.diff(_partial_mean(edges, d)) / np.diff(coordinate_cdf(edges, d))


class Codebook(NamedTuple):
    centroids: np.ndarray  # [2^b] float64, increasing, symmetric about 0
    boundaries: np.ndarray  # [2^b - 1] float64 interior cell edges (midpoints); outer ones are ±1


@functools.cache
def codebook(d: int, bits: int) -> Codebook:
    """Lloyd-Max codebook of f_d with 2^bits cells (bits = 0, the prod quantizer's empty MSE
    stage, is the single centroid 0). Computed once per (d, bits); arrays are read-only."""
    d = _check_dim(d)
    bits = _check_int(bits, "bits", range(5), "codebooks exist for 0..4 bits")
    k, a = 1 << bits, (d - 1) / 2
    # Start from equal-probability cells: already close for every d, so few Lloyd steps.
    edges = 2 * special.betaincinv(a, a, np.linspace(0, 1, k + 1)) - 1
    edges[0], edges[-1] = -1.0, 1.0
    centroids = _cell_means(edges, d)
    for _ in range(_LLOYD_MAX_STEPS):
        edges[1:-1] = (centroids[:-1] + centroids[1:]) / 2
        new = _cell_means(edges, d)
        new = (new - new[::-1]) / 2  # f_d is even: keep the codebook exactly symmetric
        moved = np.max(np.abs(new - centroids)) * math.sqrt(d)
        centroids = new
        if moved < _LLOYD_TOL:
            break
    else:
        raise RuntimeError(f"Lloyd-Max did not converge for d={d}, bits={bits}")
    boundaries = (centroids[:-1] + centroids[1:]) / 2
    centroids.flags.writeable = boundaries.flags.writeable = False  # shared by the cache
    return Codebook(centroids, boundaries)


def mse_distortion(d: int, bits: int, method: str = "identity") -> float:
    """D_mse(d, b) = E ||u - dequant(quant(u))||^2 for unit u.

    "identity": 1 - d sum_i P_i c_i^2 (valid at a Lloyd-Max fixed point); "integral":
    d * C(f_d, b), each cell's squared error integrated numerically against f_d. They agree
    only if the centroids are the cells' conditional means, i.e. the closed forms are right."""
    centroids, boundaries = codebook(d, bits)
    edges = np.concatenate([[-1.0], boundaries, [1.0]])
    if method == "identity":
        probs = np.diff(coordinate_cdf(edges, d))
        return float(1 - d * np.sum(probs * centroids**2))
    if method == "integral":
        cells = [
            integrate.quad(
                lambda t, c=c: (t - c) ** 2 * coordinate_density(t, d), lo, hi,
                epsabs=1e-15, epsrel=1e-13, limit=200,
            )[0]
            for lo, hi, c in zip(edges[:-1], edges[1:], centroids, strict=True)
        ]
        return float(d * math.fsum(cells))
    raise ValueError(f"method={method!r} is invalid: choose 'identity' or 'integral'")


# ---------------------------------------------------------------------------------------------
# Random matrices, a pure function of (seed, d)


def _rng(seed: Seed, d: int, role: int) -> np.random.Generator:
    parts = _seed_tuple(seed)
    return np.random.default_rng([role, d, len(parts), *parts])  # length-prefixed: no collisions


def haar_rotation(seed: Seed, d: int) -> np.ndarray:
    """Pi [d, d] float32, Haar-random orthogonal: QR of a Gaussian matrix."""
    d = _check_dim(d)
    q, r = np.linalg.qr(_rng(seed, d, _ROTATION).standard_normal((d, d)))
    return (q * np.sign(np.diag(r))).astype(np.float32)  # without the sign fix Q is not Haar


def qjl_matrix(seed: Seed, d: int) -> np.ndarray:
    """S [d, d] float32, i.i.d. N(0, 1), independent of `haar_rotation(seed, d)`."""
    d = _check_dim(d)
    return _rng(seed, d, _PROJECTION).standard_normal((d, d)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Bit packing along the last axis


def packed_size(n: int, bits: int) -> int:
    """Bytes holding n values of `bits` bits: ceil(n / 8) groups of `bits` bytes."""
    return -(-n // 8) * bits


def pack_bits(values, bits: int):
    """values [..., n] (integers < 2^bits) -> uint8 [..., packed_size(n, bits)]."""
    values = jnp.asarray(values)
    n = values.shape[-1]
    if bits == 0:
        return jnp.zeros(values.shape[:-1] + (0,), jnp.uint8)
    padded = jnp.pad(values.astype(jnp.uint32), [(0, 0)] * (values.ndim - 1) + [(0, -n % 8)])
    groups = padded.reshape(*values.shape[:-1], -1, 8)
    shifts = bits * jnp.arange(8, dtype=jnp.uint32)
    words = jnp.sum(groups << shifts, axis=-1, dtype=jnp.uint32)  # disjoint bits: sum == or
    group_bytes = (words[..., None] >> (8 * jnp.arange(bits, dtype=jnp.uint32))) & 0xFF
    return group_bytes.astype(jnp.uint8).reshape(*values.shape[:-1], -1)


def unpack_bits(packed, bits: int, n: int):
    """Inverse of `pack_bits`: uint8 [..., packed_size(n, bits)] -> uint8 [..., n]."""
    packed = jnp.asarray(packed)
    if bits == 0:
        return jnp.zeros(packed.shape[:-1] + (n,), jnp.uint8)
    group_bytes = packed.reshape(*packed.shape[:-1], -1, bits).astype(jnp.uint32)
    words = jnp.sum(
        group_bytes << (8 * jnp.arange(bits, dtype=jnp.uint32)), axis=-1, dtype=jnp.uint32
    )
    values = (words[..., None] >> (bits * jnp.arange(8, dtype=jnp.uint32))) & ((1 << bits) - 1)
    return values.astype(jnp.uint8).reshape(*packed.shape[:-1], -1)[..., :n]


def _lookup(centroids, idx):
    """centroids[idx] of a symmetric codebook by selects on |rank|, which XLA fuses with the
    unpacking: a gather made XLA:CPU write an int32 copy of the indices (4 bytes per code)
    and a separate float32 codeword array before every scores/values product."""
    half = centroids.shape[0] // 2
    if half == 0:  # the 0-bit stage of a 1-bit TurboQuantProd: the centroid 0
        return jnp.zeros(idx.shape, centroids.dtype)
    upper = idx >= half
    rank = jnp.where(upper, idx - half, half - 1 - idx)  # 0 = the centroids nearest 0
    magnitude = jnp.full(idx.shape, centroids[half])
    for r in range(1, half):
        magnitude = jnp.where(rank == r, centroids[half + r], magnitude)
    return jnp.where(upper, magnitude, -magnitude)


# ---------------------------------------------------------------------------------------------
# Quantized data


@struct.dataclass
class MSECodes:
    """Algorithm 1's codes of vectors [..., d]."""

    idx: jax.Array  # [..., packed_size(d, b)] uint8: packed codebook indices of Pi x/||x||
    norm: jax.Array  # [...] ||x||


@struct.dataclass
class ProdCodes:
    """Algorithm 2's codes of vectors [..., d]."""

    mse: MSECodes  # (b-1)-bit indices and ||x||
    signs: jax.Array  # [..., packed_size(d, 1)] uint8: bits of S r >= 0, r the rotated residual
    gamma: jax.Array  # [...] ||r||, residual norm of the unit vector


@struct.dataclass
class SplitCodes:
    outlier: MSECodes | ProdCodes
    regular: MSECodes | ProdCodes


class ProdQuery(NamedTuple):
    rotated: jax.Array  # [..., d] Pi q
    projected: jax.Array  # [..., d] S Pi q


class SplitQuery(NamedTuple):
    outlier: jax.Array | ProdQuery
    regular: jax.Array | ProdQuery


def nbytes(tree) -> int:
    """Bytes held by the arrays of a codes pytree (or of its `jax.eval_shape`)."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------------------------------------
# Quantizers. Shapes: x [..., d] vectors; codes of T vectors have batch shape [..., T];
# prepared queries [..., Q, d]; scores and weights [..., Q, T]. Leading dims broadcast.


@struct.dataclass
class TurboQuantMSE:
    """Algorithm 1: `bits` bits per coordinate plus one stored norm per vector."""

    rotation: jax.Array  # [d, d] Pi
    centroids: jax.Array  # [2^b] float32
    boundaries: jax.Array  # [2^b - 1] float32
    bits: int = struct.field(pytree_node=False)
    norm_dtype: str = struct.field(pytree_node=False, default="float16")
    # store ||x|| / <Pi u, c[idx]> instead of ||x||: <x, x~> = ||x||^2, so scores and value
    # sums are not shrunk by (1 - D_mse) (the optional scale of arXiv:2604.18555); same bytes
    unbiased: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def create(cls, d: int, bits: int, *, seed: Seed = 0, norm_dtype: str = "float16",
               unbiased: bool = False):
        return cls._create(d, _check_bits(bits), seed, norm_dtype, unbiased)

    @classmethod
    def _create(cls, d, bits, seed, norm_dtype, unbiased=False):
        """Also builds the 0-bit stage of a 1-bit TurboQuantProd."""
        centroids, boundaries = codebook(d, bits)
        return cls(
            rotation=jnp.asarray(haar_rotation(seed, d)),
            centroids=jnp.asarray(centroids, jnp.float32),
            boundaries=jnp.asarray(boundaries, jnp.float32),
            bits=bits,
            norm_dtype=_check_norm_dtype(norm_dtype),
            unbiased=bool(unbiased),
        )

    @property
    def d(self) -> int:
        return self.rotation.shape[-1]

    def rotate(self, x):
        return jnp.einsum("ij,...j->...i", self.rotation, x, precision=_HI)

    def unrotate(self, y):
        return jnp.einsum("ji,...j->...i", self.rotation, y, precision=_HI)

    def _encode(self, x):
        """(rotated unit vectors [..., d], indices [..., d], float32 norms [...])."""
        x = jnp.asarray(x, jnp.float32)
        if x.shape[-1] != self.d:
            raise ValueError(f"vectors of dim {x.shape[-1]} given to a quantizer of d={self.d}")
        norm = jnp.linalg.norm(x, axis=-1)
        y = self.rotate(x / jnp.where(norm > 0, norm, 1)[..., None])  # zero vector: norm 0
        return y, jnp.searchsorted(self.boundaries, y, method="compare_all"), norm

    def _codewords(self, codes: MSECodes):
        """Codebook vectors c[idx] [..., d] of the rotated unit vectors (no norm, no Pi^T)."""
        return _lookup(self.centroids, unpack_bits(codes.idx, self.bits, self.d))

    def _pack(self, idx, norm) -> MSECodes:
        return MSECodes(idx=pack_bits(idx, self.bits), norm=norm.astype(self.norm_dtype))

    def quantize(self, x) -> MSECodes:
        y, idx, norm = self._encode(x)
        if self.unbiased:  # <y, c[idx]> > 0 unless y = 0: each c has the sign of its cell
            dot = jnp.sum(y * self.centroids[idx], axis=-1)
            norm = norm / jnp.where(dot > 0, dot, 1)
        return self._pack(idx, norm)

    def dequantize(self, codes: MSECodes):
        norm = codes.norm.astype(jnp.float32)[..., None]
        return self.unrotate(self._codewords(codes) * norm)

    def prepare_query(self, q):
        """Pi q [..., d]: rotate once, then score against any number of codes."""
        return self.rotate(jnp.asarray(q, jnp.float32))

    def scores(self, prepared_QD, codes_T: MSECodes):
        """<q, x~_t> [..., Q, T] = ||x_t|| <Pi q, c[idx_t]>, never reconstructing x~_t."""
        dots = jnp.einsum("...qd,...td->...qt", prepared_QD, self._codewords(codes_T),
                          precision=_HI)
        return dots * codes_T.norm.astype(jnp.float32)[..., None, :]

    def rotated_sum(self, weights_QT, codes_T: MSECodes):
        """sum_t w_qt ||x_t|| c[idx_t] [..., Q, d]: partial sums add up (blocks of T), then
        `finish_sum` rotates back once."""
        scaled = weights_QT * codes_T.norm.astype(jnp.float32)[..., None, :]
        return jnp.einsum("...qt,...td->...qd", scaled, self._codewords(codes_T), precision=_HI)

    def finish_sum(self, acc):
        return self.unrotate(acc)

    def weighted_sum(self, weights_QT, codes_T: MSECodes):
        """sum_t w_qt x~_t [..., Q, d]: summed in the rotated space, rotated back once."""
        return self.finish_sum(self.rotated_sum(weights_QT, codes_T))


@struct.dataclass
class TurboQuantProd:
    """Algorithm 2: a (bits-1)-bit TurboQuantMSE plus 1-bit QJL of the residual (bits = 1 is
    pure QJL); stores ||x|| and gamma = ||residual|| per vector. Unbiased inner products."""

    mse: TurboQuantMSE
    projection: jax.Array  # [d, d] S, applied in the rotated space
    bits: int = struct.field(pytree_node=False)

    @classmethod
    def create(cls, d: int, bits: int, *, seed: Seed = 0, norm_dtype: str = "float16"):
        bits = _check_bits(bits)
        return cls(
            mse=TurboQuantMSE._create(d, bits - 1, seed, norm_dtype),
            projection=jnp.asarray(qjl_matrix(seed, d)),
            bits=bits,
        )

    @property
    def d(self) -> int:
        return self.mse.d

    def _project(self, y):
        return jnp.einsum("ij,...j->...i", self.projection, y, precision=_HI)

    def _unproject(self, z):
        return jnp.einsum("ji,...j->...i", self.projection, z, precision=_HI)

    def _signs(self, codes: ProdCodes):
        return unpack_bits(codes.signs, 1, self.d).astype(jnp.float32) * 2 - 1

    def quantize(self, x) -> ProdCodes:
        y, idx, norm = self.mse._encode(x)
        residual = y - self.mse.centroids[idx]
        return ProdCodes(
            mse=self.mse._pack(idx, norm),
            signs=pack_bits(self._project(residual) >= 0, 1),  # sign(0) = +1
            gamma=jnp.linalg.norm(residual, axis=-1).astype(self.mse.norm_dtype),
        )

    def _qjl_scale(self, codes: ProdCodes):
        """sqrt(pi/2)/d * ||x|| * gamma [...]: the QJL term's factor per vector."""
        return (QJL_SCALE / self.d) * (codes.mse.norm.astype(jnp.float32)
                                       * codes.gamma.astype(jnp.float32))

    def dequantize(self, codes: ProdCodes):
        correction = self._unproject(self._signs(codes)) * self._qjl_scale(codes)[..., None]
        norm = codes.mse.norm.astype(jnp.float32)[..., None]
        return self.mse.unrotate(self.mse._codewords(codes.mse) * norm + correction)

    def prepare_query(self, q) -> ProdQuery:
        rotated = self.mse.prepare_query(q)
        return ProdQuery(rotated=rotated, projected=self._project(rotated))

    def scores(self, prepared_QD: ProdQuery, codes_T: ProdCodes):
        """||x|| (<Pi q, c[idx]> + gamma sqrt(pi/2)/d <S Pi q, z>) [..., Q, T]."""
        qjl = jnp.einsum("...qd,...td->...qt", prepared_QD.projected, self._signs(codes_T),
                         precision=_HI)
        return (self.mse.scores(prepared_QD.rotated, codes_T.mse)
                + qjl * self._qjl_scale(codes_T)[..., None, :])

    def rotated_sum(self, weights_QT, codes_T: ProdCodes):
        """(MSE part, signs part), each [..., Q, d]: partial sums that add up."""
        signs_sum = jnp.einsum("...qt,...td->...qd",
                               weights_QT * self._qjl_scale(codes_T)[..., None, :],
                               self._signs(codes_T), precision=_HI)
        return self.mse.rotated_sum(weights_QT, codes_T.mse), signs_sum

    def finish_sum(self, acc):
        """One S^T and one Pi^T product per query."""
        mse_sum, signs_sum = acc
        return self.mse.unrotate(mse_sum + self._unproject(signs_sum))

    def weighted_sum(self, weights_QT, codes_T: ProdCodes):
        """sum_t w_qt x~_t [..., Q, d]."""
        return self.finish_sum(self.rotated_sum(weights_QT, codes_T))


# ---------------------------------------------------------------------------------------------
# Fractional rates: an outlier split of the original channels (the paper's 2.5 / 3.5-bit settings)


@dataclasses.dataclass(frozen=True)
class OutlierSplit:
    """n_outlier channels at bits_outlier bits, the rest at bits_regular, as two instances."""

    n_outlier: int
    bits_outlier: int
    bits_regular: int

    def __post_init__(self):
        _check_int(self.n_outlier, "n_outlier", range(MIN_DIM, 1 << 30),
                   f"an outlier set needs at least {MIN_DIM} channels (or no split at all)")
        _check_bits(self.bits_outlier, "bits_outlier")
        _check_bits(self.bits_regular, "bits_regular")

    def check(self, d: int) -> None:
        """Both instances need at least MIN_DIM channels of the head dim d."""
        if d - self.n_outlier < MIN_DIM:
            raise ValueError(
                f"n_outlier={self.n_outlier} does not fit head dim d={d}: the regular set "
                f"needs at least {MIN_DIM} channels, so use n_outlier <= {d - MIN_DIM} (or a "
                f"larger head dim)"
            )


def outlier_permutation(calib_ND):
    """Channel order [..., d] int32 by RMS over the calibration vectors [..., N, d], largest
    first: its first n_outlier entries are the outlier channels of `TurboQuantSplit`."""
    rms = jnp.sqrt(jnp.mean(jnp.square(jnp.asarray(calib_ND, jnp.float32)), axis=-2))
    return jnp.argsort(-rms, axis=-1, stable=True).astype(jnp.int32)


@struct.dataclass
class TurboQuantSplit:
    """Two independent quantizers on the outlier and regular channels; scores add up."""

    perm: jax.Array  # [..., d] int32, outlier channels first; leading dims broadcast against
    # the vectors' (a per-head split of [B, H, T, d] vectors is [H, 1, d])
    outlier: TurboQuantMSE | TurboQuantProd
    regular: TurboQuantMSE | TurboQuantProd

    @classmethod
    def create(cls, d: int, split: OutlierSplit, *, kind: str = "mse", seed: Seed = 0,
               norm_dtype: str = "float16", perm=None, unbiased: bool = False):
        """`perm` defaults to "the first n_outlier channels"; pass `outlier_permutation(...)`."""
        d = _check_dim(d)
        split.check(d)
        seed = _seed_tuple(seed)
        perm = jnp.arange(d, dtype=jnp.int32) if perm is None else jnp.asarray(perm, jnp.int32)
        if perm.shape[-1] != d:
            raise ValueError(f"perm has {perm.shape[-1]} channels: it must order all d={d}")
        return cls(
            perm=perm,
            outlier=make_quantizer(split.bits_outlier, split.n_outlier, kind=kind,
                                   seed=(*seed, 0), norm_dtype=norm_dtype, unbiased=unbiased),
            regular=make_quantizer(split.bits_regular, d - split.n_outlier, kind=kind,
                                   seed=(*seed, 1), norm_dtype=norm_dtype, unbiased=unbiased),
        )

    @property
    def d(self) -> int:
        return self.perm.shape[-1]

    def _parts(self, x):
        x, perm = jnp.broadcast_arrays(jnp.asarray(x, jnp.float32), self.perm)
        x = jnp.take_along_axis(x, perm, axis=-1)
        return x[..., : self.outlier.d], x[..., self.outlier.d:]

    def _merge(self, outlier, regular):
        x = jnp.concatenate([outlier, regular], axis=-1)
        x, perm = jnp.broadcast_arrays(x, self.perm)
        return jnp.take_along_axis(x, jnp.argsort(perm, axis=-1), axis=-1)

    def quantize(self, x) -> SplitCodes:
        outlier, regular = self._parts(x)
        return SplitCodes(self.outlier.quantize(outlier), self.regular.quantize(regular))

    def dequantize(self, codes: SplitCodes):
        return self._merge(self.outlier.dequantize(codes.outlier),
                           self.regular.dequantize(codes.regular))

    def prepare_query(self, q) -> SplitQuery:
        outlier, regular = self._parts(q)
        return SplitQuery(self.outlier.prepare_query(outlier), self.regular.prepare_query(regular))

    def scores(self, prepared_QD: SplitQuery, codes_T: SplitCodes):
        return (self.outlier.scores(prepared_QD.outlier, codes_T.outlier)
                + self.regular.scores(prepared_QD.regular, codes_T.regular))

    def rotated_sum(self, weights_QT, codes_T: SplitCodes):
        return (self.outlier.rotated_sum(weights_QT, codes_T.outlier),
                self.regular.rotated_sum(weights_QT, codes_T.regular))

    def finish_sum(self, acc):
        return self._merge(self.outlier.finish_sum(acc[0]), self.regular.finish_sum(acc[1]))

    def weighted_sum(self, weights_QT, codes_T: SplitCodes):
        return self.finish_sum(self.rotated_sum(weights_QT, codes_T))


def make_quantizer(bits: int | OutlierSplit, d: int, *, kind: str = "mse", seed: Seed = 0,
                   norm_dtype: str = "float16", perm=None, unbiased: bool = False):
    """TurboQuantMSE / TurboQuantProd for integer bits, TurboQuantSplit for an OutlierSplit
    (whose channel order `perm` is described in `TurboQuantSplit.create`). `unbiased`
    rescales mse codes (`TurboQuantMSE.unbiased`); prod codes are unbiased already."""
    if kind not in KEY_QUANTIZERS:
        raise ValueError(f"kind={kind!r} is invalid: choose one of {KEY_QUANTIZERS}")
    if isinstance(bits, OutlierSplit):
        return TurboQuantSplit.create(d, bits, kind=kind, seed=seed, norm_dtype=norm_dtype,
                                      perm=perm, unbiased=unbiased)
    if perm is not None:
        raise ValueError(f"perm is given but bits={bits!r} has no outlier split: drop perm")
    if kind == "prod":
        return TurboQuantProd.create(d, bits, seed=seed, norm_dtype=norm_dtype)
    return TurboQuantMSE.create(d, bits, seed=seed, norm_dtype=norm_dtype, unbiased=unbiased)


def bits_per_value(bits: int | OutlierSplit, d: int, *, kind: str = "mse", norm_bits: int = 16,
                   include_norms: bool = True) -> float:
    """Stored bits per coordinate: packed codes (b index bits, or b-1 index bits + 1 sign bit
    for prod) plus, with include_norms, one float per instance (two for prod: ||x|| and gamma).
    Equals 8 * nbytes(codes) / (vectors * d) of `make_quantizer(bits, d, ...)`'s codes."""
    if kind not in KEY_QUANTIZERS:
        raise ValueError(f"kind={kind!r} is invalid: choose one of {KEY_QUANTIZERS}")
    _check_int(norm_bits, "norm_bits", (16, 32), "norms are stored as float16 or float32")
    d = _check_dim(d)
    if isinstance(bits, OutlierSplit):
        bits.check(d)
        parts = [(bits.n_outlier, bits.bits_outlier), (d - bits.n_outlier, bits.bits_regular)]
    else:
        parts = [(d, _check_bits(bits))]
    floats = 1 if kind == "mse" else 2
    total = sum(
        8 * (packed_size(n, b) if kind == "mse" else packed_size(n, b - 1) + packed_size(n, 1))
        + include_norms * floats * norm_bits
        for n, b in parts
    )
    return total / d


def quarter_split(bits: int, d: int) -> OutlierSplit:
    """The paper's recipe: a quarter of the channels at bits + 1, the rest at bits (d=64:
    16@3 + 48@2 for bits=2, 2.25 code bits and 2.75 with its two float16 norms)."""
    d = _check_dim(d)
    if _check_bits(bits) == BITS[-1]:
        raise ValueError(f"bits={bits} has no wider split: the outliers would need "
                         f"{bits + 1} bits, use bits <= {BITS[-2]}")
    return OutlierSplit(max(d // 4, MIN_DIM), bits + 1, bits)


def split_for_rate(rate: float, d: int) -> OutlierSplit:
    """The split whose payload is exactly `rate` code bits per coordinate: the channels above
    floor(rate) get one more bit (2.5 at d=64 -> 32@3 + 32@2; 3.5 -> 32@4 + 32@3)."""
    d = _check_dim(d)
    low = math.floor(rate)
    n_outlier = (rate - low) * d
    if low not in BITS[:-1] or n_outlier != round(n_outlier) or n_outlier == 0:
        raise ValueError(
            f"rate={rate!r} at d={d} is not a split: use 1 < rate < 4 with (rate - floor(rate)) "
            f"* d a whole number of channels (an integer rate needs no split)"
        )
    return OutlierSplit(int(n_outlier), low + 1, low)


# ---------------------------------------------------------------------------------------------
# The cache's configuration


@dataclasses.dataclass(frozen=True)
class TurboQuantConfig:
    """What a TurboQuant KV cache stores. Keys use `key_quantizer`; values are always mse.

    `outlier` splits the channels of keys (and of values when value_bits is None); `bits` must
    then equal outlier.bits_regular; `outlier_select` says which channels are the outliers
    (OUTLIER_SELECT; the cache picks them from the prompt). `window` = most recent tokens kept
    in full precision. `unbiased`: mse codes store the unshrinking scale (TurboQuantMSE)."""

    bits: int = 3
    key_quantizer: str = "mse"
    value_bits: int | None = None
    outlier: OutlierSplit | None = None
    seed: int = 0
    window: int = 0
    norm_dtype: str = "float16"
    outlier_select: str = "head"
    unbiased: bool = False

    def __post_init__(self):
        _check_bits(self.bits)
        if self.key_quantizer not in KEY_QUANTIZERS:
            raise ValueError(
                f"key_quantizer={self.key_quantizer!r} is invalid: choose one of {KEY_QUANTIZERS}"
            )
        if self.value_bits is not None:
            _check_bits(self.value_bits, "value_bits")
        if self.outlier is not None:
            if not isinstance(self.outlier, OutlierSplit):
                raise ValueError(
                    f"outlier={self.outlier!r} is invalid: use OutlierSplit(n_outlier, "
                    f"bits_outlier, bits_regular) or None"
                )
            if self.outlier.bits_regular != self.bits:
                raise ValueError(
                    f"bits={self.bits} conflicts with outlier.bits_regular="
                    f"{self.outlier.bits_regular}: set bits to the regular channels' bits"
                )
        if self.outlier_select not in OUTLIER_SELECT:
            raise ValueError(f"outlier_select={self.outlier_select!r} is invalid: choose one "
                             f"of {OUTLIER_SELECT}")
        if not isinstance(self.unbiased, bool):
            raise ValueError(f"unbiased={self.unbiased!r} is invalid: use True or False")
        _seed_tuple(self.seed)
        _check_int(self.window, "window", range(1 << 30),
                   "the full-precision window is a token count >= 0")
        _check_norm_dtype(self.norm_dtype)

    @property
    def key_spec(self) -> int | OutlierSplit:
        return self.bits if self.outlier is None else self.outlier

    @property
    def value_spec(self) -> int | OutlierSplit:
        return self.key_spec if self.value_bits is None else self.value_bits

    def check(self, d: int) -> None:
        """Head-dim dependent checks (the split must fit), before any cache is built."""
        _check_dim(d)
        for bits in (self.key_spec, self.value_spec):
            if isinstance(bits, OutlierSplit):
                bits.check(d)

    def make_quantizers(self, d: int, *, stream: tuple[int, ...] = ()):
        """(keys, values) quantizers for head dim d, seeded by (seed, *stream, 0 or 1): pass
        stream=(layer,) for one rotation per layer."""
        self.check(d)
        seed = (self.seed, *stream)
        keys = make_quantizer(self.key_spec, d, kind=self.key_quantizer, seed=(*seed, 0),
                              norm_dtype=self.norm_dtype, unbiased=self.unbiased)
        values = make_quantizer(self.value_spec, d, kind="mse", seed=(*seed, 1),
                                norm_dtype=self.norm_dtype, unbiased=self.unbiased)
        return keys, values
