"""One module per `rectrain VERB` (``rectrain.cli`` maps verbs to them): each parses its flags (``add_arguments``)
and runs (``run``) as a thin layer over the library: train, check, eval, predict, export, scan, prepare, synth,
model, bench."""
