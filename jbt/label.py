"""`python -m jbt.label`: the command line of jbt.tools.label (where the code and its docs live)."""

from jbt.tools.label import main

if __name__ == "__main__":
  main()
