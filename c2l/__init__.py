"""The ``c2l`` command line: the top layer, above every component (see pyproject.toml).

It parses arguments, calls each component's plain entry point and turns the components'
expected errors into one-line messages; nothing imports it.
"""
