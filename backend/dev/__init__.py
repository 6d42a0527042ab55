"""Developer tooling: synthetic shapes, local processes, the local stack, the demo, plain baselines.

Used by the CLI, the tests and the benchmarks; the engine and the faces never import it.
"""
