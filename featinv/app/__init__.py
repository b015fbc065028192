"""``featinv app``: an interactive explorer in the browser (Gradio; install the ``app`` extra).

Layers: :mod:`~featinv.app.session` (the served pair, upload checks), :mod:`~featinv.app.panels`
(the four panels as plain functions over the library), :mod:`~featinv.app.ui` (the Gradio page)
and :mod:`~featinv.commands.app` (the command line). The app imports the library; nothing in the
library imports the app. This ``__init__`` imports nothing, so that importing a submodule never
runs another.
"""
