"""The measurements behind docs/benchmarks.md, each a script run from the project root as
`python -m experiments.NAME` (`--help` says what it measures and how long it takes). Each
prints a table and writes experiments/results/ (JSON with the command, the commit and the
date, and Markdown beside it); `experiments.lib` is what they share."""
