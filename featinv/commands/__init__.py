"""Command faces: one module per ``featinv <command>``, each with ``main(argv=None) -> int``."""
