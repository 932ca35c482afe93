"""Scale-out building blocks (docs/scale-out.md): CURVE key files (`keys`), CURVE-secured tcp sockets
(`secure_socket`, `client_allow_list`, `handshake_watch`), the expert -> shard map (`shard_map`,
`shard_balance`), the precision of hidden states on the wire (`wire_precision`), and the Ray placement:
`--cluster` addresses (`cluster_address`), a cluster with one `ShardNode` actor per node (`ray_cluster`,
`shard_node`) and the /proc reading its teardown checks with (`process_tree`)."""
