"""Running a Mixture-of-Experts GGUF model: hyper-parameters, dense weights, attention, routing,
the forward pass, tokenizer, sampling and generation (single process; the pipeline's router
drives the same blocks and sends the experts to its compute workers). See docs/model.md."""

from mer.model.experts import ExpertFn, GGUFExperts, StoreExperts
from mer.model.forward import ForwardPass, ForwardResult, forward
from mer.model.generate import GenerationResult, generate, generate_tokens
from mer.model.model import MoEModel
from mer.model.moe import Routing
from mer.model.sampling import Sampler
from mer.model.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "ExpertFn", "ForwardPass", "ForwardResult", "GGUFExperts", "GenerationResult", "MoEModel", "Routing", "Sampler",
    "StoreExperts", "Tokenizer", "forward", "generate", "generate_tokens", "load_tokenizer",
]
