"""The node agent: kubelet's stand-in, running pods as local processes (see :mod:`.agent`)."""
