"""``python -m featinv``: the same command as ``featinv`` (:func:`featinv.cli.main`)."""
from featinv.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
