"""The request path of a completion, one module per step: parse, admit, dispatch, outcome."""
