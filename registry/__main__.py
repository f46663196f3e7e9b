"""`python -m registry`."""

from .cli import main

main()
