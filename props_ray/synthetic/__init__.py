"""DP synthetic instructions (arXiv 2402.13659): the generator's examples, the embedding and clustering
of synthetic prompts, and the annotation of the resampled prompts."""
