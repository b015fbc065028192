"""``featinv app``: an interactive explorer in the browser (Gradio; install the ``app`` extra).

Layers: :mod:`~featinv.app.session` (the served pair, upload checks), :mod:`~featinv.app.show` (pictures,
captions and tables, without the page), :mod:`~featinv.app.panels` (one module per panel, listed in
:data:`featinv.registry.PANELS`), :mod:`~featinv.app.widgets` (what a panel is, the shared Gradio parts),
:mod:`~featinv.app.ui` (the page) and :mod:`~featinv.commands.app` (the command line). The app imports the
library; nothing in the library imports the app. This ``__init__`` imports nothing, so that importing a
submodule never runs another.
"""
