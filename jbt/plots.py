"""`python -m jbt.plots`: the command line of jbt.tools.plots (where the code and its docs live)."""

from jbt.tools.plots import main

if __name__ == "__main__":
  main()
