"""Benchmarks that print ratios measured side by side in one run.

  python -m pipeline.bench energy     [--size=full|mid|tiny] [--json]
  python -m pipeline.bench loader     [--dataset_dir=DIR] [--json]
  python -m pipeline.bench checkpoint [--size=mid] [--json]
  python -m pipeline.bench step       [--size=mid] [--peak_tflops=X] [--json]
  python -m pipeline.bench sample     [--size=full] [--candidates=4,16] [--time_size=mid] [--json]

One module per command (`run(**kwargs) -> dict`, `format_table(dict) -> str`); `__main__` maps
commands and flags onto them. `harness` holds the model sizes, modes, compiled steps and timing
they share; `flops` counts FLOPs from a jaxpr; `naive_head` is the reference energy head.
"""
