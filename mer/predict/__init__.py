"""Predictors: from the routing decisions seen so far, which experts will be wanted next."""
