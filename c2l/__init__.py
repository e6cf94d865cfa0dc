"""The ``c2l`` command line: the top layer, above every component (see pyproject.toml).

It parses arguments, calls each component's plain entry point and turns the components'
expected errors into one-line messages; no component imports it. One module is public
for Python callers: :mod:`c2l.routes`, the client side of the fallback hierarchy
(DESIGN.md section 5), which ``c2l chat`` uses too.
"""
