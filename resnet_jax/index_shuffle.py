"""The training order, a whole epoch at a time: the batches of grain's
``MapDataset.range(n).shuffle(seed).repeat().batch(batch)``, computed with numpy.

grain shuffles one index at a time (``index_shuffle``: a Simon block cipher with cycle walking, keyed per
epoch by ``(seed + epoch) mod 2**32``), through several Python calls per example: a large part of the
host's share of a small step on a GPU. This module computes the same permutation for a whole epoch at once
in numpy (:func:`epoch_order`) and slices the batches from it (:func:`shuffled_batch`), so that the order is
the one every earlier run trained with (``tests/test_index_shuffle.py`` compares it with grain's, element by
element). The draws of a CIFAR batch of 128 went from 1.72 to 0.072 ms of host time on a 2-vCPU Xeon
(``benchmarks/train_loop.py``, docs/cifar.md section 5).

The cipher, as grain implements it: block size ``B = max(ceil(log2(max_index)) rounded up to even, 16)``,
word size ``W = B / 2``; round keys ``std::seed_seq{seed}.generate(rounds)``; per pair of rounds
``left ^= f(right) ^ k[i]``, ``right ^= f(left) ^ k[i+1]`` with ``f(x) = (rotl(x, 1) & rotl(x, 8)) ^
rotl(x, 2)`` on W-bit words; re-encrypting while the result exceeds ``max_index``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

ROUNDS = 4  # grain's ShuffleMapDataset
# Up to blocks of 2 x 11 bits (4M values, 32 MB; datasets of up to 2**21 examples, ImageNet's 1.28M included)
# every block value is encrypted once and the cycle walks are resolved together (:func:`_walk_table`): a
# dataset far smaller than the block (a test's 135 examples in 65,536 values) walks thousands of steps.
_TABLE_WORD_BITS = 11
_MASK32 = 0xFFFFFFFF


def seed_seq_words(seed: int, count: int) -> list[int]:
  """``std::seed_seq{seed}.generate()`` of ``count`` 32-bit words (C++ [rand.util.seedseq])."""
  n, s, v = count, 1, [seed & _MASK32]
  b = [0x8B8B8B8B] * n
  t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
  p = (n - t) // 2
  q, m = p + t, max(s + 1, n)

  def mix(x: int) -> int:
    return x ^ (x >> 27)

  for k in range(m):
    r1 = (1664525 * mix(b[k % n] ^ b[(k + p) % n] ^ b[(k - 1) % n])) & _MASK32
    r2 = (r1 + (s if k == 0 else (k % n + v[k - 1] if k <= s else k % n))) & _MASK32
    b[(k + p) % n] = (b[(k + p) % n] + r1) & _MASK32
    b[(k + q) % n] = (b[(k + q) % n] + r2) & _MASK32
    b[k % n] = r2
  for k in range(m, m + n):
    r3 = (1566083941 * mix((b[k % n] + b[(k + p) % n] + b[(k - 1) % n]) & _MASK32)) & _MASK32
    r4 = (r3 - k % n) & _MASK32
    b[(k + p) % n] ^= r3
    b[(k + q) % n] ^= r4
    b[k % n] = r4
  return b


def _word_size(max_index: int) -> int:
  block = math.ceil(math.log2(max_index))
  return min(max(block + block % 2, 16), 64) // 2


def _encrypt(x: np.ndarray, keys: list[int], w: int) -> np.ndarray:
  """The Simon rounds on blocks of ``2 w`` bits (uint64): the high word ``left``, the low word ``right``."""
  mask, shift = np.uint64((1 << w) - 1), np.uint64(w)

  def rotl(y: np.ndarray, r: int) -> np.ndarray:
    return ((y << np.uint64(r)) | (y >> np.uint64(w - r))) & mask

  def f(y: np.ndarray) -> np.ndarray:
    return (rotl(y, 1) & rotl(y, 8)) ^ rotl(y, 2)

  left, right = (x >> shift) & mask, x & mask
  for i in range(0, len(keys), 2):
    left = left ^ f(right) ^ (np.uint64(keys[i]) & mask)
    right = right ^ f(left) ^ (np.uint64(keys[i + 1]) & mask)
  return (left << shift) | right


def index_shuffle(index: np.ndarray, max_index: int, seed: int, rounds: int = ROUNDS) -> np.ndarray:
  """The positions of ``index`` (each in ``[0, max_index]``) in grain's permutation of ``[0, max_index]``
  keyed by ``seed``: ``grain``'s ``index_shuffle(i, max_index, seed, rounds)`` for every ``i``."""
  index = np.asarray(index, np.uint64)
  if max_index == 0:
    return np.zeros_like(index)
  keys, w = seed_seq_words(seed, rounds), _word_size(max_index)
  limit = np.uint64(max_index)
  if w <= _TABLE_WORD_BITS:
    # An index above the block (only max_index = 2**B itself) keeps its low 2 w bits, as grain's cipher does.
    return _walk_table(keys, w, limit)[(index & np.uint64((1 << (2 * w)) - 1)).astype(np.int64)]
  out = _encrypt(index, keys, w)
  walk = out > limit
  while walk.any():  # cycle walking: encrypt again until the value falls inside the range
    out[walk] = _encrypt(out[walk], keys, w)
    walk = out > limit
  return out


def _walk_table(keys: list[int], w: int, limit: np.uint64) -> np.ndarray:
  """For every block value v, the first of ``E(v), E(E(v)), ...`` not above ``limit`` (E: the cipher), by
  pointer doubling: ``jump[v]`` starts at ``E(v)``; while it is above ``limit`` it becomes ``jump[jump[v]]``,
  which never passes a value inside the range, since only values above it are jumped over. A walk of length
  L is resolved after log2(L) rounds, so ``2 w + 1`` rounds resolve every walk that starts inside the range
  (values in cycles with none inside the range never resolve, and are never asked for)."""
  jump = _encrypt(np.arange(1 << (2 * w), dtype=np.uint64), keys, w)
  for _ in range(2 * w + 1):
    out = np.flatnonzero(jump > limit)
    if out.size == 0:
      break
    jump[out] = jump[jump[out].astype(np.int64)]
  return jump


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, epoch_seed: int) -> np.ndarray:
  """One epoch's order: ``index_shuffle(i, n - 1, epoch_seed)`` for every ``i`` in ``[0, n)`` (int64, read
  only), computed once per epoch (a few ms for 45,000 examples) and kept for the batches that read it."""
  order = index_shuffle(np.arange(n), n - 1, epoch_seed).astype(np.int64)
  order.flags.writeable = False
  return order


def shuffled_batch(n: int, seed: int, batch: int, b: int) -> np.ndarray:
  """Batch ``b`` (int64 indices in ``[0, n)``) of ``MapDataset.range(n).shuffle(seed).repeat().batch(batch)``:
  positions ``b * batch`` to ``b * batch + batch - 1`` of the endless sequence of epochs, epoch ``e`` the
  permutation keyed by ``(seed + e) mod 2**32``. A batch may span two epochs."""
  pieces, position, end = [], b * batch, (b + 1) * batch
  while position < end:
    epoch, start = divmod(position, n)
    take = min(end - position, n - start)
    pieces.append(epoch_order(n, (seed + epoch) % 2**32)[start : start + take])
    position += take
  return np.concatenate(pieces)
