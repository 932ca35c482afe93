"""Scale-out building blocks (docs/scale-out.md): CURVE key files (`keys`), CURVE-secured tcp sockets
(`secure_socket`, `client_allow_list`, `handshake_watch`), the expert -> shard map (`shard_map`,
`shard_balance`) and the precision of hidden states on the wire (`wire_precision`)."""
