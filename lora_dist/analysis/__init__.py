"""The paper's Section 7 as a tool: what a trained low-rank update ΔW = s·B·A is and does.

- `lowrank`: the math, in float64 and never on a d x d matrix: the SVD of s·B·A from QR
  factorisations of B and Aᵀ, the normalised subspace similarity φ, the top-r subspace of a
  weight by subspace iteration, seeded random subspaces.
- `updates`: an adapter directory (ours or PEFT's) as one low-rank update per adapted module, with
  rank_pattern, alpha_pattern and rsLoRA scales, and the row slices of a fused-slice adapter.
- `base_weights`: base weights by tensor name from safetensors shards, one tensor at a time.
- `reports`: the spectrum, similarity and amplification reports (plain dicts, written as JSON).
- `figures`: matplotlib figures of those reports.
"""
