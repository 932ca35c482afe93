"""Expected expert payloads of synthetic stores, for tests that compare what was written or read."""

from __future__ import annotations

import numpy as np

from mer.store.synth import SynthSpec, fill_expert


def expert_payload(spec: SynthSpec, expert_id: int) -> np.ndarray:
    """A fresh array with the payload bytes that `synth_store` writes for `expert_id`."""
    return fill_expert(spec, expert_id, np.empty(spec.expert_format().payload_nbytes, dtype=np.uint8))
