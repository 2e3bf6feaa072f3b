"""GPU benchmarks at the real sizes: python -m bench COMMAND (bench/__main__.py lists them; bench/README.md has
the measurements)."""
