"""MoE-I² compression (arXiv 2411.01016): inter-expert pruning found by a layer-wise genetic
search and a block-wise KT-reception field with non-uniform per-layer ratios, then intra-expert
low-rank decomposition with non-uniform ranks."""
