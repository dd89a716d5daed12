"""`python -m taskring`: the same command line as the `taskring` script."""

from taskring.cli import main

if __name__ == "__main__":
    main()
