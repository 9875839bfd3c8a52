class Rejected(Exception):
    """A molecule that cannot be featurised. ``reason`` says why, in words a chemist can act on;
    ``code`` is a short stable category used for the manifest's per-reason counts."""

    def __init__(self, code: str, reason: str, smiles: str | None = None):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.smiles = smiles
