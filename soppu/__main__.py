"""`python -m soppu`: the same command line as `soppu`."""

from soppu.cli import main

main()
