"""Train a ResNet of this library: ``python train.py [--config=configs/NAME.py] [--config.KEY=VALUE ...] [--workdir=DIR]``.

With no arguments it trains CIFAR ResNet-20 on scikit-learn's digits (``configs/digits.py``) into
``./runs/digits``. Running again with the same ``--workdir`` resumes from the newest checkpoint.
Bad flags or config values print one ``error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "configs", "digits.py")


def parse_args(argv: list[str]):
  """``(config, workdir)`` from the command line; any flag or config problem is a ConfigError."""
  import ml_collections
  from absl import flags
  from ml_collections import config_flags
  from resnet_jax.errors import ConfigError

  fv = flags.FlagValues()
  try:
    config_path = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith(("--config=", "-config="))),
                       DEFAULT_CONFIG)
    if not os.path.isfile(config_path.split(":", 1)[0]):
      raise ConfigError(f"config file {config_path} not found: expected a Python file with get_config(), "
                        f"e.g. --config=configs/digits.py")
    config_flag = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "training config file",
                                                  flag_values=fv, lock_config=True, sys_argv=argv)
    workdir_flag = flags.DEFINE_string("workdir", None, "output folder (default ./runs/<config name>)",
                                       flag_values=fv)
    fv(argv)
    config = config_flag.value
    if not isinstance(config, ml_collections.ConfigDict):  # config_flags' placeholder for a bad file
      raise ConfigError(f"cannot load the config file given to --config ({fv['config'].serialize()}): "
                        f"expected a Python file with get_config() returning a ConfigDict")
  except ConfigError:
    raise
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, SyntaxError, ImportError) as e:
    message = " ".join(str(e).replace('\\n', " ").split())
    while len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
      message = message[1:-1]  # str(KeyError) quotes the whole message, sometimes twice
    message = message.replace("\\'", "'")
    key = message.split(" ")[0].strip("'")
    if isinstance(e, (KeyError, AttributeError)) and any(  # A --config.KEY the config does not have.
        a.startswith("--config.") and key in a.split("=", 1)[0] for a in argv):
      raise ConfigError(f"bad command line: unknown config key {message} (every key with its default: "
                        f"resnet_jax.config_check.base_config())") from None
    raise ConfigError(f"bad command line: {message}") from None
  workdir = workdir_flag.value or os.path.join(
      "runs", os.path.splitext(os.path.basename(config_path.split(":", 1)[0]))[0])
  return config, workdir


def main(argv: list[str]) -> int:
  config, workdir = parse_args(argv)
  from resnet_jax.config_check import validate_config
  validate_config(config)
  if config.get("host_memory", "default") == "keep":  # before jax starts its backend (resnet_jax.host_memory)
    from resnet_jax.host_memory import keep_host_memory
    keep_host_memory()
  from resnet_jax import train_lib
  summary = train_lib.train_and_evaluate(config, workdir)
  print(f"{summary['model']} on {summary['dataset']}: test accuracy {summary['test_accuracy']:.4f} "
        f"(best {summary['best_test_accuracy']:.4f}) after {summary['steps']} steps, "
        f"{summary['train_time_s']:.1f} s")
  w = summary["workdir"]
  print(f"outputs in {w}: summary.json, metrics.jsonl, curves.png, config.json, checkpoints/")
  return 0


if __name__ == "__main__":
  from resnet_jax.errors import run_cli
  run_cli(main, sys.argv)
