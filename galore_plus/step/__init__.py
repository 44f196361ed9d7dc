"""The step of one projected weight: its order (:mod:`.weight_step`), where its rows live (:mod:`.layouts`), the
refresh and its schedule, the projection, applying the update, finiteness, moment transfer and per-layer
accumulation."""
