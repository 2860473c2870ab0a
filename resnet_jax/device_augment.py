"""Training batches made on the device (``config.dataset.augment_on='device'``): the uint8 training images
live in device memory, and the jitted step gathers, pads, crops, flips, normalises (and cuts out) each
batch itself.

The host then hands the step only what :meth:`resnet_jax.data.Dataset.train_draws` draws: the example
indices, their labels, the crop draws ``(dy, dx, mirror)`` of :func:`resnet_jax.augment.crop_draws`
and with cutout the centres ``(cy, cx)`` of :func:`resnet_jax.augment.cutout_draws`, a few hundred bytes
per batch, so an accelerator never waits for the input pipeline. The draws are the
host pipeline's own (same generator, same order), so a batch made here equals the batch
:meth:`resnet_jax.data.Dataset.train_batch` makes on the host: resume, multi-host slicing and the
augmentation itself are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def make_batch(padding: int, mean: np.ndarray, std: np.ndarray, cutout: int = 0) -> Callable[[jax.Array, dict], dict]:
  """``(images, draws) -> {"image", "label"}``: the normalised training batch of ``draws`` (jit-able).

  ``images`` is the whole training set, NHWC, uint8 (pixels / 255) or float in [0, 1]; ``draws`` holds
  ``index`` (int32 ``[B]``), ``label`` and ``crop`` (int32 ``[B, 3]``: ``dy``, ``dx`` in
  ``[0, 2 * padding]`` and ``mirror``). Each image is zero-padded by ``padding`` pixels per side, the
  window at ``(dy, dx)`` of its original size is cut out and mirrored where ``mirror`` is 1, and the
  result is ``(x - mean) / std`` in float32, the operations of :func:`resnet_jax.augment.normalize` in
  the same order. With ``cutout`` > 0, ``draws`` also holds ``cutout`` (int32 ``[B, 2]``, the centres
  ``(cy, cx)``) and each image's square is then set to 0 after the normalisation, clipped at the border,
  as :func:`resnet_jax.augment.cutout` does on the host.
  """
  mean32 = np.asarray(mean, np.float32)
  std32 = np.asarray(std, np.float32)

  def batch(images: jax.Array, draws: dict) -> dict:
    x = jnp.take(images, draws["index"], axis=0)
    _, h, w, c = x.shape
    if padding:
      x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def window(img, crop):
      cut = lax.dynamic_slice(img, (crop[0], crop[1], 0), (h, w, c))
      return jnp.where(crop[2] > 0, cut[:, ::-1], cut)

    x = jax.vmap(window)(x, draws["crop"])
    scale = np.float32(1 / 255) if images.dtype == jnp.uint8 else np.float32(1)
    out = x.astype(jnp.float32) * scale
    out = (out - mean32) / std32
    if cutout > 0:
      # A square of side 2 * max(h, w) + 1 covers the whole image wherever its centre lies, as any
      # larger one does: the same mask with bounds that fit in int32.
      span = min(int(cutout), 2 * max(h, w) + 1)
      top = draws["cutout"][:, 0, None] - span // 2  # [B, 1]
      left = draws["cutout"][:, 1, None] - span // 2
      ys = lax.broadcasted_iota(jnp.int32, (1, h), 1)
      xs = lax.broadcasted_iota(jnp.int32, (1, w), 1)
      rows = (ys >= top) & (ys < top + span)  # [B, h]
      cols = (xs >= left) & (xs < left + span)  # [B, w]
      out = jnp.where(rows[:, :, None, None] & cols[:, None, :, None], jnp.float32(0), out)
    return {"image": out, "label": draws["label"]}

  return batch
