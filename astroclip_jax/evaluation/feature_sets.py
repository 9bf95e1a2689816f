"""The feature sets every probe scores (`--mode=probe`: properties, posteriors, morphology):
name -> (modality, where its features come from in the embeddings table).

Per modality: the run's embedding, then the baselines of eval_knn (frozen tower features, the
towers with untrained heads, PCA of the model inputs); and the g, r, z magnitudes. A source is
an embeddings column, "pca:<column>" or "photometry" (`probe.feature_sets` builds them)."""

FEATURE_SETS = {
    name: (modality, source) for modality in ("image", "spectrum") for name, source in (
        (modality, f"{modality}_embedding"),
        (f"frozen_{modality}_features", f"{modality}_features"),
        (f"untrained_heads_{modality}", f"untrained_{modality}_embedding"),
        (f"pca_{modality}_inputs", f"pca:{modality}_inputs"))}
FEATURE_SETS["photometry"] = ("photometry", "photometry")


def modality_of(name: str) -> str:
    """The modality a feature set's scores belong to (its own name when not in the table)."""
    return FEATURE_SETS.get(name, (name,))[0]
