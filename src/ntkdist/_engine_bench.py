"""``python -m ntkdist._engine_bench``: kept as an entry point (code in
:mod:`ntkdist._bench._engine`)."""

from ._bench._engine import main as main

if __name__ == "__main__":
    raise SystemExit(main())
