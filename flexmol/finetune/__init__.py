"""Fine-tuning: LoRA on a pre-trained checkpoint with a task head, the MoleculeNet protocol
(scaffold split, seeds, best-validation test metric) and the baselines beside it."""
