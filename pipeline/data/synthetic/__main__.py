"""Writes synthetic LIBERO-format episodes:

  python -m pipeline.data.synthetic --dst=DIR [--format=lerobot_v21] [--episodes=20]
      [--image_size=256] [--min_length=12] [--max_length=20] [--seed=0] [--suites=a,b]
"""
from absl import app
from absl import flags

from pipeline.data import synthetic


def _define_flags():
  flags.DEFINE_string("dst", None, "Output directory.")
  flags.DEFINE_enum("format", "lerobot_v21", synthetic.FORMATS, "On-disk format.")
  flags.DEFINE_integer("episodes", 20, "Episodes to write.")
  flags.DEFINE_integer("image_size", 256, "Side of the square camera images.")
  flags.DEFINE_integer("min_length", 12, "Fewest frames of an episode.")
  flags.DEFINE_integer("max_length", 20, "Most frames of an episode.")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.DEFINE_list("suites", [], "LIBERO suites whose tasks to use (default: all four).")
  flags.mark_flag_as_required("dst")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    root = synthetic.write_dataset(f.dst, f.format, f.episodes, image_size=f.image_size,
                                   min_length=f.min_length, max_length=f.max_length,
                                   seed=f.seed, suites=f.suites or None)
  except ValueError as e:  # bad lengths or suite names
    raise SystemExit(f"synthetic failed: {e}") from None
  print(f"wrote {f.episodes} {f.format} episodes to {root}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
