"""Running a Mixture-of-Experts GGUF model: hyper-parameters, dense weights, attention, routing,
the forward pass, tokenizer, sampling and generation (single process; the pipeline's router
drives the same blocks and sends the experts to its compute workers)."""
