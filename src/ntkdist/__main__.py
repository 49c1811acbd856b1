"""``python -m ntkdist``: the command line."""

from ._cli import script

if __name__ == "__main__":
    script()
