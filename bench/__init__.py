"""The benchmarks: `tokenlean bench` (every method and level side by side: bench.run, bench.report)
and the focused studies, each a module run as `python -m bench.<name>` (engine_speed,
export_speed, lookupvit_speed, serving, fidelity). Results are committed under bench/results/.

Importing this package (or bench.cli) loads neither torch nor transformers."""
