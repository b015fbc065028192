"""The command-line faces: one module per ``featinv <command>``, each parsing arguments and calling
the library. Nothing in the library imports this package."""
