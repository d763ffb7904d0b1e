"""The live explorer (``deconvis explore``): a local web app over a run folder or a model.

:mod:`~deconvis.explore.session` holds the model, the image set and the recorded forward of the
current image (every value and max-pool switch), so a click on a unit only runs that unit's
backward; :mod:`~deconvis.explore.app` is the Starlette app (the page and its JSON API);
:mod:`~deconvis.explore.server` reads the settings and starts uvicorn on 127.0.0.1. Starlette and
uvicorn are the optional extra ``deconvis[explore]``: only ``app`` and ``server`` import them.
"""
