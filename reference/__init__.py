"""Reference implementations of the catalog's token-reduction methods.

One module per paper, named after its catalog id (``reference/<id>.py``); a
catalog entry names its module in ``reference:`` and ``python -m tools validate``
checks that the module exists.
"""
