"""`make demo`: the whole Reo-LM pipeline on an embedded synthetic corpus (see reolm/demo.py)."""

from reolm.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
