"""Frame channels between peers: the interface (``base``), the frame codec (``codec``), ZeroMQ
and in-memory transports (``zeromq``, ``memory``, ``loopsock``) and choosing one (``factory``)."""
