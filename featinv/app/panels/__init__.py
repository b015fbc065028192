"""The app's panels, one module each, listed in :data:`featinv.registry.PANELS` (the tabs, in order).

Each module holds ``run`` (the panel's callback: library calls in, pictures and tables out) and ``build``
(its tab's layout), joined as ``PANEL`` (:class:`featinv.app.widgets.Panel`). Adding a panel is one module
here plus one entry in the registry.
"""
