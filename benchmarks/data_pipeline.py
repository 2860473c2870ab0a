"""Input-pipeline speed on an image folder of small JPEGs: the one-time decode into memory, and the
steady-state images/s of the training pipeline with the images in memory against decoding them at every
step (``config.dataset.in_memory='never'``), and of the two halves of augmentation on the device
(``config.dataset.augment_on='device'``: the host pipeline's draws, and the jitted batch alone), without
any model.

  python benchmarks/data_pipeline.py                                   # 5,000 random 32x32 JPEGs, q75
  python benchmarks/data_pipeline.py --images 20000 --json data.json
  python benchmarks/data_pipeline.py --folder DIR                      # an existing image folder, read only

The folder (``train/<class>/NNNN.jpg``, random pixels, written with Pillow) goes to a temporary folder,
or to ``--dir``, reused when it already holds the images; ``--folder`` times an existing image folder
(``train/<class>/*``, CIFAR-10's JPEGs say) instead, and writes nothing into it. Decode time (wall and
CPU seconds of the process): :func:`resnet_jax.image_files.decode_images` of every file, with 1 thread
and with the default thread count (the CPUs usable), in that order (the first pass also reads the files
from disk unless they are in the page cache). Pipeline images/s:
``train_pipeline`` (``--augment``, default pad_crop_flip, ``--num-threads`` grain threads), batches of
``--batch`` read for ``--seconds`` after ``--warmup`` batches; the median of ``--repeats`` such windows,
the two storages interleaved round by round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from resnet_jax import data, datasets, image_files, machine  # noqa: E402
from resnet_jax.config_check import base_config  # noqa: E402
from resnet_jax.errors import ConfigError, run_cli  # noqa: E402


def write_folder(root: str, images: int, size: int, classes: int, quality: int) -> None:
  from PIL import Image

  rng = np.random.default_rng(0)
  for i in range(images):
    folder = os.path.join(root, "train", f"class{i % classes:02d}")
    path = os.path.join(folder, f"{i:06d}.jpg")
    if os.path.exists(path):
      continue
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(path, quality=quality)


def pipeline_rate(
  ds: data.Dataset, batch: int, num_threads: int, warmup: int, seconds: float, on_device: bool = False
) -> float:
  it = iter(data.train_pipeline(ds, batch, seed=0, num_threads=num_threads, on_device=on_device))
  try:
    for _ in range(warmup):
      next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
      next(it)
      n += 1
    return n * batch / (time.perf_counter() - t0)
  finally:
    if hasattr(it, "close"):
      it.close()


def device_batch_rate(ds: data.Dataset, batch: int):
  """``rate(warmup, seconds)``: images/s of :func:`resnet_jax.device_augment.make_batch` alone, jitted on
  jax's default device, the training images in its memory (what ``augment_on='device'`` adds to the step)."""
  import jax

  from resnet_jax import device_augment

  images = jax.device_put(ds.train_x)
  make = jax.jit(device_augment.make_batch(ds.crop_padding_used, ds.mean, ds.std, ds.cutout))
  draws = [ds.train_draws(np.arange(i, i + batch) % ds.num_train, np.random.default_rng(i)) for i in range(8)]
  draws = [jax.device_put(d) for d in draws]

  def rate(warmup: int, seconds: float) -> float:
    for i in range(warmup):
      jax.block_until_ready(make(images, draws[i % 8]))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
      jax.block_until_ready(make(images, draws[n % 8]))
      n += 1
    return n * batch / (time.perf_counter() - t0)

  return rate


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--images", type=int, default=5000)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--quality", type=int, default=75, help="JPEG quality")
  p.add_argument("--dir", default=None, help="where the folder is written (default: a temporary folder)")
  p.add_argument(
    "--folder", default=None, help="an existing image folder (train/<class>/*) to time instead; never written"
  )
  p.add_argument("--augment", default="pad_crop_flip")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--num-threads", type=int, default=2, help="grain read threads (config default: 2)")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--seconds", type=float, default=3.0)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", dest="json_out", default=None)
  args = p.parse_args(argv)
  if args.folder and args.dir:
    raise ConfigError("--folder times an existing folder and --dir names where to write one: give one of them")

  with tempfile.TemporaryDirectory() as tmp:
    root = args.folder or args.dir or tmp
    if not args.folder:
      write_folder(root, args.images, args.size, args.classes, args.quality)
    paths, _, _ = datasets.scan_image_folder(root, "train")
    decode, decode_cpu = {}, {}
    for threads in (1, None):
      t0, c0 = time.perf_counter(), time.process_time()
      image_files.decode_images(paths, args.size, progress=False, threads=threads)
      key = "1 thread" if threads == 1 else f"{image_files.decode_threads()} threads"
      decode[key], decode_cpu[key] = time.perf_counter() - t0, time.process_time() - c0

    def load(in_memory: str) -> data.Dataset:
      cfg = base_config().dataset
      cfg.update(
        {
          "name": "image_folder",
          "data_dir": root,
          "image_size": args.size,
          "augment": args.augment,
          "holdout": 0.1,
          "in_memory": in_memory,
        }
      )
      return data.load_dataset(cfg, progress=False)

    t0 = time.perf_counter()
    memory = load("always")
    load_s = time.perf_counter() - t0
    stream = load("never")
    rates: dict[str, list[float]] = {"memory": [], "per-step decode": [], "device draws": [], "device batch": []}
    make_batch = device_batch_rate(memory, args.batch)
    for _ in range(args.repeats):
      for name, ds in (("memory", memory), ("per-step decode", stream)):
        rates[name].append(pipeline_rate(ds, args.batch, args.num_threads, args.warmup, args.seconds))
      rates["device draws"].append(
        pipeline_rate(memory, args.batch, args.num_threads, args.warmup, args.seconds, on_device=True)
      )
      rates["device batch"].append(make_batch(args.warmup, args.seconds))

  import PIL

  result = {
    "cpu": machine.cpu_name(),
    # The CPU by name, family/model and instruction set (one name covers CPUs of different speed), and the
    # versions that decode and batch: Pillow decodes the JPEGs, numpy and jax augment.
    "machine": {**machine.describe(), "pillow": PIL.__version__, "numpy": np.__version__},
    "cpus_usable": image_files.decode_threads(),
    "images": len(paths),
    "image_size": args.size,
    # Random pixels written here at --quality, or the files of --folder as they are.
    "source": "folder" if args.folder else "random",
    "jpeg_quality": None if args.folder else args.quality,
    "decode_s": {k: round(v, 3) for k, v in decode.items()},
    "decode_cpu_s": {k: round(v, 3) for k, v in decode_cpu.items()},
    "load_average": [round(v, 2) for v in os.getloadavg()],
    "load_dataset_in_memory_s": round(load_s, 3),
    "pipeline": {"augment": args.augment, "batch": args.batch, "grain_threads": args.num_threads},
    "pipeline_images_per_s": {k: round(statistics.median(v)) for k, v in rates.items()},
    "pipeline_images_per_s_repeats": {k: [round(x) for x in v] for k, v in rates.items()},
  }
  print(json.dumps(result, indent=2))
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  run_cli(main, sys.argv[1:])
