"""Fine-tuning: LoRA on a pre-trained checkpoint with a task head, the MoleculeNet protocol
(scaffold split, seeds, best-validation test metric) and the arms beside it: the checkpoint fully
fine-tuned, the same architecture from scratch, linear probes on frozen embeddings, ECFP4 + RF."""
