"""The what-if simulator: replay a routing trace through the live cache code, offline, without reading weights.

`simulator` replays a trace through the same `SlotTable`, eviction policies and step acquisition
order as the live I/O worker; `predictors` feeds prefetch hints into it as the live predictor
would; `projection` turns reads into bytes and projected seconds per token; `report` builds the
rows of `mer-pipeline trace simulate`; `plot` draws hit rate against cache size.
"""
