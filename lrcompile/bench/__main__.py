"""`python -m lrcompile.bench`: the same run as `lrcompile bench`."""

from lrcompile.bench.command import main

if __name__ == "__main__":
    main()
