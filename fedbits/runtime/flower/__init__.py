"""fedbits on real machines: Flower carries the bytes, fedbits' round loop stays the same.

``runtime.kind = "flower"`` makes ``fedbits run`` submit the run to a Flower 1.41
SuperLink (:mod:`.launch`). On the SuperLink's machine the ServerApp
(:mod:`.server_app`) runs the simulator's round loop with Flower messages as the
transport; on each SuperNode a thin ClientApp (:mod:`.client_app`) relays the
downlink to a long-lived node worker (:mod:`.worker`, :mod:`.node`) that keeps the
model in memory and trains on its data holder's own data. :mod:`.holder` is what a
holder owns and accepts (its data, its pins), :mod:`.identity` which node key is which
holder, :mod:`.protocol` what server and nodes say to each other, :mod:`.app` the
generated Flower App, :mod:`.processes` and :mod:`.certs` start the SuperLink and
SuperNodes with TLS and authentication. Importing this package loads neither torch
nor Flower.
"""
