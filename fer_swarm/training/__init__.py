"""Training and TFLite export (``fer-swarm train``). Needs the optional ``train`` extra (TensorFlow).

Nothing outside this package imports TensorFlow: workers and ``eval`` run the
exported model through LiteRT alone.
"""
