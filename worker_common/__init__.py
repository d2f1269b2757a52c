"""What both worker kinds share: the engine loop, the messages they exchange with the ingress, and the
Protocols of the engine and the KV transport as the workers use them."""
