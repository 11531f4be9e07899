"""Checkpoints and recovery: the barrier participant of each peer (``participant``), peer 0's
coordinator (``coordinator``), the object and manifest formats (``format``), rescaling
(``rescale``) and the typed interface to the peer (``host``)."""
