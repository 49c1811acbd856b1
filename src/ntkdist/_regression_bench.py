"""``python -m ntkdist._regression_bench``: kept as an entry point (code in
:mod:`ntkdist._bench._regression`)."""

from ._bench._regression import main as main

if __name__ == "__main__":
    raise SystemExit(main())
