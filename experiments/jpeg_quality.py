"""What JPEG compression costs: ``configs/cifar10_fast.py`` trained on the same images at several JPEG qualities.

usage: python experiments/jpeg_quality.py --data_dir DIR [--qualities source,50,30] [--epochs 10]
           [--dtype float32] [--workdir runs/jpeg_quality] [--out docs/figures/cifar] [--table_only]

``source`` trains on ``DIR`` as it is. Every number ``q`` first writes a copy of the dataset,
``WORKDIR/images_q<q>/``, in which every image (training and held-out or test alike) is decoded and
encoded again as a JPEG of quality ``q`` (Pillow, 4:2:0 chroma subsampling, Pillow's default), under
the same file names, so the held-out split (chosen from the names) is the same 5,000 images; a PNG's
copy is a JPEG file that keeps the ``.png`` name, which Pillow reads by its content. ``DIR`` is an image folder
(``train/<class>/*``, optionally ``test/<class>/*``) or the python-pickle release; from the pickles
``source`` is the lossless original and the copies hold ``train/`` and ``test/``.

Each quality trains ``configs/cifar10_fast.py`` with only ``num_epochs`` and ``model.dtype`` changed (and its time
budget off), in the ``train.py`` workdir ``WORKDIR/q<q>`` (``WORKDIR/source``): the same command resumes what is
unfinished. Writes ``OUT/jpeg_quality.json`` and ``OUT/jpeg_quality.md``: per quality the mean file
size, the PSNR of the training images against the source's, the validation accuracy (with test-time
flip), the steps and the wall time. The slope of accuracy against quality, measured at qualities below
the source's, is the evidence this gives about what the source's own compression costs; it cannot
measure the source against the images before their compression when ``DIR`` is itself JPEG.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # The repository, when run from a clone without install.

CONFIG = os.path.join(ROOT, "configs", "cifar10_fast.py")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DONE = ".complete"  # Written last into a finished copy: a copy without it is written again.


def parse_qualities(text: str) -> list[str]:
  """``"source,50,30"`` -> ``["source", "50", "30"]``; ConfigError for anything but source and 1-95."""
  from resnet_jax.errors import ConfigError

  items = [q.strip() for q in text.split(",") if q.strip()]
  for q in items:
    if q != "source" and not (q.isdigit() and 1 <= int(q) <= 95):
      raise ConfigError(f"--qualities={text!r}: expected a comma-separated list of 'source' and JPEG qualities 1-95")
  if not items or len(set(items)) != len(items):
    raise ConfigError(f"--qualities={text!r}: expected distinct entries, at least one")
  return items


def source_images(data_dir: str) -> list[tuple[str, np.ndarray | str]]:
  """Every image of the dataset as ``(relative path of its copy, uint8 HWC array or source file path)``."""
  from resnet_jax import datasets

  if os.path.isdir(os.path.join(data_dir, "train")):  # An image folder (the pickle release has no train/).
    items = []
    for split in ("train", "test"):
      if split == "test" and not os.path.isdir(os.path.join(data_dir, "test")):
        continue
      scan = datasets.scan_folder(data_dir, split)
      for path in scan.paths:
        items.append((os.path.relpath(path, data_dir), path))
    return items
  x_train, y_train, x_test, y_test = datasets.load_cifar(data_dir, "cifar10")
  items = []
  for split, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
    for i, (x, y) in enumerate(zip(xs, ys)):
      items.append((os.path.join(split, CIFAR10_CLASSES[int(y)], f"{i:05d}.jpg"), x))
  return items


def _decode(source: np.ndarray | str) -> np.ndarray:
  from resnet_jax.image_files import open_rgb

  return source if isinstance(source, np.ndarray) else np.asarray(open_rgb(source), dtype=np.uint8)


def write_copy(items: list[tuple[str, np.ndarray | str]], quality: int, folder: str) -> dict:
  """Encode every image at ``quality`` into ``folder``; returns the mean file size and the PSNR of the
  training images against the source (both also kept in ``folder/.complete``, which marks it done)."""
  import io

  from PIL import Image

  from resnet_jax.image_files import decode_threads

  marker = os.path.join(folder, DONE)
  if os.path.isfile(marker):
    with open(marker) as f:
      return json.load(f)

  def work(item: tuple[str, np.ndarray | str]) -> tuple[int, float, int, bool]:
    rel, source = item
    pixels = _decode(source)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    path = os.path.join(folder, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(buffer.getvalue())
    buffer.seek(0)
    decoded = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float64)
    train = rel.startswith("train" + os.sep)
    return len(buffer.getvalue()), float(((decoded - pixels) ** 2).sum()), pixels.size, train

  with concurrent.futures.ThreadPoolExecutor(decode_threads()) as pool:  # Pillow releases the GIL.
    results = list(pool.map(work, items))
  mse = sum(se for _, se, _, train in results if train) / sum(n for _, _, n, train in results if train)
  info = {
    "images": len(results),
    "mean_bytes": float(np.mean([n for n, _, _, _ in results])),
    "psnr_db": float(10 * np.log10(255.0**2 / mse)) if mse > 0 else float("inf"),
  }
  with open(marker, "w") as f:
    json.dump(info, f)
  return info


def source_info(items: list[tuple[str, np.ndarray | str]]) -> dict:
  """The source's mean file size (None for the pickles)."""
  sizes = [os.path.getsize(s) for _, s in items if isinstance(s, str)]
  return {"images": len(items), "mean_bytes": float(np.mean(sizes)) if sizes else None, "psnr_db": None}


def run_config(data_dir: str, epochs: float, dtype: str):
  """``configs/cifar10_fast.py`` on ``data_dir`` with ``epochs`` epochs in ``dtype`` and no time budget (every
  quality trains the same steps, however fast the machine runs); nothing else changed."""
  from resnet_jax.config_check import load_config_file

  c = load_config_file(CONFIG)
  c.dataset.data_dir = data_dir
  c.num_epochs = float(epochs)
  c.time_budget_minutes = 0.0
  c.model.dtype = dtype
  c.progress_bar = False
  return c


def markdown(rows: list[dict], eval_split: str) -> str:
  lines = [
    f"| JPEG quality | mean file size (bytes) | PSNR of the training images against the source (dB) | "
    f"accuracy on the {eval_split} | steps | wall time (min) |",
    "|---|---|---|---|---|---|",
  ]
  for r in rows:
    size = f"{r['mean_bytes']:.0f}" if r["mean_bytes"] is not None else "(pickles)"
    psnr = f"{r['psnr_db']:.2f}" if r["psnr_db"] is not None else "(the source)"
    lines.append(
      f"| {r['quality']} | {size} | {psnr} | {100 * r['accuracy']:.2f}% | {r['steps']} | {r['wall_time_s'] / 60:.1f} |"
    )
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  from resnet_jax import machine
  from resnet_jax.data import eval_split_name
  from resnet_jax.errors import ConfigError, parse_args

  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--data_dir", required=True, help="CIFAR-10: pickle release or train/<class>/ images")
  parser.add_argument("--qualities", default="source,50,30", help="comma-separated: source and JPEG qualities")
  parser.add_argument("--epochs", type=float, default=10.0, help="epochs of every run (default 10)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="model.dtype")
  parser.add_argument("--workdir", default=os.path.join("runs", "jpeg_quality"), help="copies and train.py runs")
  parser.add_argument("--out", default=os.path.join("docs", "figures", "cifar"))
  parser.add_argument("--table_only", action="store_true", help="write the table from the finished runs")
  args = parse_args(
    parser,
    argv,
    "usage: python experiments/jpeg_quality.py --data_dir DIR [--qualities source,50,30] [--epochs E] "
    "[--dtype float32|bfloat16] [--workdir W] [--out O] [--table_only]",
  )
  qualities = parse_qualities(args.qualities)
  if not args.epochs > 0:
    raise ConfigError(f"--epochs={args.epochs}: expected a positive number of epochs")
  folders = {q: args.data_dir if q == "source" else os.path.join(args.workdir, f"images_q{q}") for q in qualities}
  runs = {q: os.path.join(args.workdir, "source" if q == "source" else f"q{q}") for q in qualities}
  if not args.table_only:
    from resnet_jax import host_memory

    # Before jax starts and before the threads that write the copies: glibc's arena setting only reaches
    # threads that have not allocated yet (resnet_jax.host_memory).
    host_memory.apply(host_memory.choose_for_config(run_config(args.data_dir, args.epochs, args.dtype)))
  items = source_images(args.data_dir)
  infos = {}
  for q in qualities:
    if q == "source":
      infos[q] = source_info(items)
    elif args.table_only and not os.path.isfile(os.path.join(folders[q], DONE)):
      raise ConfigError(f"--table_only: no finished copy {folders[q]} (run without --table_only first)")
    else:
      if not os.path.isfile(os.path.join(folders[q], DONE)):
        print(f"== JPEG quality {q}: writing {len(items):,} images to {folders[q]}", flush=True)
      infos[q] = write_copy(items, int(q), folders[q])
  if not args.table_only:
    from resnet_jax import train_loop

    for q in qualities:
      print(f"== JPEG quality {q}: training {args.epochs:g} epochs in {runs[q]}", flush=True)
      summary = train_loop.train_and_evaluate(run_config(folders[q], args.epochs, args.dtype), runs[q])
      print(f"quality {q}: accuracy {100 * summary['test_accuracy']:.2f}%", flush=True)
  missing = [q for q in qualities if not os.path.isfile(os.path.join(runs[q], "summary.json"))]
  if missing:
    raise ConfigError(
      f"--table_only: no finished run for qualities {', '.join(missing)} in {args.workdir} "
      "(run without --table_only first)"
    )
  rows = []
  for q in qualities:
    with open(os.path.join(runs[q], "summary.json")) as f:
      summary = json.load(f)
    rows.append(
      {
        "quality": q,
        "mean_bytes": infos[q]["mean_bytes"],
        "psnr_db": infos[q]["psnr_db"],
        "accuracy": summary["test_accuracy"],
        "steps": summary["steps"],
        "wall_time_s": summary["wall_time_s"],
        "images_per_sec": summary["images_per_sec"],
      }
    )
  with open(os.path.join(runs[qualities[0]], "data.json")) as f:
    info = json.load(f)
  eval_split = eval_split_name(info)
  result = {
    "command": f"python experiments/jpeg_quality.py --data_dir CIFAR10_DIR --qualities {args.qualities} "
    f"--epochs {args.epochs:g} --dtype {args.dtype}",
    "config": "configs/cifar10_fast.py",
    "epochs": args.epochs,
    "dtype": args.dtype,
    "machine": machine.one_line(),
    "eval_split": eval_split,
    "rows": rows,
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "jpeg_quality.json"), "w") as f:
    json.dump(result, f, indent=1)
  table = markdown(rows, eval_split)
  with open(os.path.join(args.out, "jpeg_quality.md"), "w") as f:
    f.write(table)
  print(table)
  print(f"wrote {os.path.join(args.out, 'jpeg_quality.json')} and jpeg_quality.md")
  return 0


if __name__ == "__main__":
  from resnet_jax.errors import run_cli

  run_cli(main)
