"""Train a ResNet of this library.

usage: python train.py [--config=configs/NAME.py] [--config.KEY=VALUE ...] [--workdir=DIR] [--print_config]

With no arguments it trains CIFAR ResNet-20 on scikit-learn's digits (configs/digits.py) into
./runs/digits. Running again with the same --workdir resumes from the newest checkpoint. A run writes
metrics.jsonl, TensorBoard event files (tensorboard --logdir runs/), summary.json, curves.png,
config.json and checkpoints/ into its workdir. Bad flags or config values print one "error: ..."
line and exit with status 2.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "configs", "digits.py")
HELP, HELPFULL = ("-h", "--help", "-help", "--helpshort", "-helpshort", "-?"), ("--helpfull", "-helpfull")


def help_text(fv) -> str:
  """The usage, the flags, the shipped configs, and every config key with default, type and description."""
  from resnet_jax.config_check import describe_config

  out = [__doc__.strip(), "", "flags:"]
  for usage, name in (
    ("--config=FILE", "config"),
    ("--config.KEY=VALUE", None),
    ("--workdir=DIR", "workdir"),
    ("--print_config", "print_config"),
    ("-h, --help", "help"),
    ("--helpfull", "helpfull"),
  ):
    out.append(f"  {usage:<20}{fv[name].help if name else 'set one config key (the keys are below)'}")
  out += ["", "configs (--config=configs/NAME.py):"]
  for path in sorted(glob.glob(os.path.join(HERE, "configs", "*.py"))):
    with open(path) as f:
      doc = ast.get_docstring(ast.parse(f.read())) or "-"
    out.append(f"  {os.path.splitext(os.path.basename(path))[0]:<20}{doc.splitlines()[0]}")
  out += ["", "config keys (--config.KEY=VALUE) and their defaults (resnet_jax.config_check.base_config()):"]
  for key, default, description in describe_config():
    group = hasattr(default, "to_dict")  # A ConfigDict of keys.
    value, kind = ("", "group") if group else (repr(default), type(default).__name__)
    out.append(f"  {key:<34}{value:<11}{kind:<7}{description}".rstrip())
  return "\n".join(out)


def write_out(text: str) -> None:
  """``text`` on stdout; a reader that stops early (``python train.py --help | head``) is no error."""
  try:
    print(text, flush=True)
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit too.


def parse_args(argv: list[str]):
  """``(config, workdir, print_config)`` from the command line; any flag or config problem is a ConfigError.

  ``-h``/``--help`` print :func:`help_text`, ``--helpfull`` absl's listing of every flag; both exit 0.
  """
  import ml_collections
  from absl import flags
  from ml_collections import config_flags

  from resnet_jax.errors import ConfigError

  fv = flags.FlagValues()
  wants_help = next((a.split("=", 1)[0] for a in argv[1:] if a.split("=", 1)[0] in HELP + HELPFULL), None)
  try:
    config_path = next(
      (a.split("=", 1)[1] for a in argv[1:] if a.startswith(("--config=", "-config="))), DEFAULT_CONFIG
    )
    if not wants_help and not os.path.isfile(config_path.split(":", 1)[0]):
      raise ConfigError(
        f"config file {config_path} not found: expected a Python file with get_config(), "
        f"e.g. --config=configs/digits.py"
      )
    config_flag = config_flags.DEFINE_config_file(
      "config",
      DEFAULT_CONFIG,
      "training config file (default: configs/digits.py)",
      flag_values=fv,
      lock_config=True,
      sys_argv=argv,
    )
    workdir_flag = flags.DEFINE_string("workdir", None, "output folder (default: ./runs/<config name>)", flag_values=fv)
    print_flag = flags.DEFINE_bool(
      "print_config",
      False,
      "print the config as the run will use it (after the overrides and validation; JSON, as in config.json) and exit",
      flag_values=fv,
    )
    flags.DEFINE_bool("help", False, "show this help and exit", short_name="h", flag_values=fv)
    flags.DEFINE_bool("helpfull", False, "show every flag in absl's format and exit", flag_values=fv)
    if wants_help:
      write_out(help_text(fv) if wants_help in HELP else f"{__doc__.strip()}\n\nflags:\n{fv.get_help()}")
      raise SystemExit(0)
    fv(argv)
    config = config_flag.value
    if not isinstance(config, ml_collections.ConfigDict):  # config_flags' placeholder for a bad file
      raise ConfigError(
        f"cannot load the config file given to --config ({fv['config'].serialize()}): "
        f"expected a Python file with get_config() returning a ConfigDict"
      )
  except ConfigError:
    raise
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, SyntaxError, ImportError) as e:
    message = " ".join(str(e).replace("\\n", " ").split())
    while len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
      message = message[1:-1]  # str(KeyError) quotes the whole message, sometimes twice
    message = message.replace("\\'", "'")
    key = message.split(" ")[0].strip("'")
    if isinstance(e, (KeyError, AttributeError)) and any(  # A --config.KEY the config does not have.
      a.startswith("--config.") and key in a.split("=", 1)[0] for a in argv
    ):
      raise ConfigError(
        f"bad command line: unknown config key {message} (every key with its default: "
        f"resnet_jax.config_check.base_config())"
      ) from None
    raise ConfigError(f"bad command line: {message}") from None
  workdir = workdir_flag.value or os.path.join(
    "runs", os.path.splitext(os.path.basename(config_path.split(":", 1)[0]))[0]
  )
  return config, workdir, print_flag.value


def main(argv: list[str]) -> int:
  config, workdir, print_config = parse_args(argv)
  if print_config:  # Training validates the config itself (train_and_evaluate), before any work.
    from resnet_jax.config_check import validate_config

    validate_config(config)
    write_out(json.dumps(config.to_dict(), indent=2))
    return 0
  from resnet_jax import host_memory  # before jax starts its backend (resnet_jax.host_memory)

  host_memory.apply(host_memory.choose_for_config(config))
  if config.distributed.initialize:  # jax's fatal errors of a multi-host run as one line (not a stack dump)
    from resnet_jax.distributed_stderr import condense_fatal_errors

    d = config.distributed
    condense_fatal_errors(d.process_id, d.num_processes, d.coordinator_address, d.init_timeout_s)
  from resnet_jax import train_loop

  summary = train_loop.train_and_evaluate(config, workdir)
  print(
    f"{summary['model']} on {summary['dataset']}: test accuracy {summary['test_accuracy']:.4f} "
    f"(best {summary['best_test_accuracy']:.4f}) after {summary['steps']} steps, "
    f"{summary['train_time_s']:.1f} s"
    + (
      f" (weight average; the last weights alone: {summary['unaveraged_test_accuracy']:.4f})"
      if "unaveraged_test_accuracy" in summary
      else ""
    )
  )
  w = summary["workdir"]
  print(f"outputs in {w}: summary.json, metrics.jsonl, TensorBoard events, curves.png, config.json, checkpoints/")
  return 0


if __name__ == "__main__":
  from resnet_jax.errors import run_cli

  run_cli(main, sys.argv)
