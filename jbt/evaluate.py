"""`python -m jbt.evaluate`: the command line of jbt.tools.evaluate (where the code and its docs live)."""

from jbt.tools.evaluate import main

if __name__ == "__main__":
  main()
