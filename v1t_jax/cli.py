"""Command-line conventions shared by every absl entry point of the project.

`run(main)` is `absl.app.run(main)` except that `--help` / `--helpshort` / `--helpfull` exit 0
(absl exits 1 after printing help) and an unknown config field is a one-line flags error;
`no_positional(argv)` is the usage error every `main` raises on a stray positional argument
(absl passes them to `main` untouched). `compilation_cache(path)` turns on JAX's persistent
compilation cache for the entry points that compile (train, evaluate, sweep, predict, insilico).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from absl import app, flags


def no_positional(argv: Sequence[str]):
  """Raises a usage error naming the positional arguments after the program name, if any."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional argument(s) {' '.join(argv[1:])!r}: every "
                         "option is a --flag=value")


class _HelpFlag(flags.BooleanFlag):
  """absl's help flags, exiting 0: help that was asked for is not an error."""

  def __init__(self, name: str, short_name: str | None, full: bool):
    super().__init__(name, False, "show full help" if full else "show this help",
                     short_name=short_name, allow_hide_cpp=True)
    self._full = full

  def parse(self, argument):
    if self._parse(argument):
      app.usage(shorthelp=not self._full, writeto_stdout=True)
      if not self._full:
        print("\nTry --helpfull to get a list of all flags.")
      sys.exit(0)


def define_help_flags():
  """Replaces absl's --help, --helpshort (alias) and --helpfull by ones exiting 0. Idempotent."""
  if "help" in flags.FLAGS and isinstance(flags.FLAGS["help"], _HelpFlag):
    return
  app.define_help_flags()   # absl's; app.run's own call is then a no-op
  for name in ("help", "?", "helpshort", "helpfull"):
    delattr(flags.FLAGS, name)
  flags.DEFINE_flag(_HelpFlag("help", "?", full=False))
  flags.DEFINE_flag(_HelpFlag("helpshort", None, full=False))
  flags.DEFINE_flag(_HelpFlag("helpfull", None, full=True))


def _innermost_message(error: BaseException) -> str:
  while error.args and isinstance(error.args[0], BaseException):   # AttributeError(KeyError(..))
    error = error.args[0]
  return str(error.args[0]) if error.args else str(error)


def parse_flags(argv: list[str]) -> list[str]:
  """`absl.app.parse_flags_with_usage`, and an override of a config field that does not exist
  (`--config.train.lr_typo=1`: ml_collections raises AttributeError / KeyError from inside the
  parser) is a one-line flags error too, keeping ml_collections' "Did you mean" hint."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    if not overrides:
      raise
    message = ". ".join(  # one line: the hint is on a line of its own
        line.strip() for line in _innermost_message(e).splitlines() if line.strip())
    key = message.split("'")[1] if message.startswith("'") else None
    named = [a for a in overrides if key in a.split("=")[0].split(".")] if key else []
    sys.stderr.write(f"FATAL Flags parsing error: {' '.join(named or overrides)}: no such config "
                     f"field: {message}\nPass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


def run(main: Callable[[list[str]], object], flags_parser=parse_flags):
  """`absl.app.run` with help flags that exit 0 and one-line errors for unknown config fields."""
  define_help_flags()
  app.run(main, flags_parser=flags_parser)


DEFAULT_CACHE = os.path.join("~", ".cache", "v1t_jax", "jax")
CACHE_MAX_BYTES = 4 * 2**30   # least recently used programs are evicted beyond this
CACHE_HELP = ("folder of JAX's persistent compilation cache: a step compiled once on this machine "
              "loads in about a second in later runs (default: $JAX_COMPILATION_CACHE_DIR, else "
              f"{DEFAULT_CACHE}); '' turns it off")


def compilation_cache(path: str | None, flag: str = "--compilation_cache") -> str | None:
  """Turns on JAX's persistent compilation cache in `path` (None: the default above; '': off),
  before anything compiles; returns the folder, or None when off. A folder given explicitly
  that cannot be written is an error naming `flag`; an unusable default only turns the cache
  off (with a warning), so a read-only home never stops a run."""
  import jax
  explicit = path is not None
  if path is None:
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_CACHE
  if not path:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if "://" not in path:   # remote folders (gs://) are checked by JAX itself
    path = os.path.expanduser(path)
    try:
      os.makedirs(path, exist_ok=True)
      writable = os.access(path, os.W_OK)
    except OSError:
      writable = False
    if not writable:
      if explicit:
        raise ValueError(f"{flag}={path}: not a writable folder")
      print(f"warning: compilation cache off ({path} is not writable; {flag} sets another)",
            file=sys.stderr)
      jax.config.update("jax_enable_compilation_cache", False)
      return None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  # A size limit turns on JAX's file lock, so concurrent runs (sweep workers) share it safely.
  jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
  return path
