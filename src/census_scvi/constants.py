"""Names shared across stages: artifact files, obs/var keys, defaults (as scvi's REGISTRY_KEYS)."""

from __future__ import annotations

# obs / var columns
BATCH_KEY = "batch"
SOMA_JOINID = "soma_joinid"
FEATURE_ID = "feature_id"
FEATURE_NAME = "feature_name"
CELL_TYPE = "cell_type"

# stages, in order
STAGES = ("prepare", "train", "embed", "evaluate")

# run directory layout
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
PREPARE_DIR = "prepare"
TRAIN_DIR = "train"
EMBED_DIR = "embed"
EVALUATE_DIR = "evaluate"
HVG_FILE = "hvg.parquet"
HV_GENES_PKL = "hv_genes.pkl"
LOGS_DIR = "logs"
CHECKPOINTS_DIR = "checkpoints"
HISTORY_FILE = "history.csv"
LOSS_CURVE_FILE = "loss_curve.png"
LATENT_FILE = "latent.npy"
LATENT_VAR_FILE = "latent-var.npy"
LATENT_IDX_FILE = "latent-idx.npy"
EMBEDDING_SOMA = "embedding.soma"
MINIFIED_MODEL_DIR = "final_scvi_optimized"
PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
UMAP_FILE = "umap.png"
MODEL_CARD_FILE = "model_card.md"
#: the nearest-cell index (census-scvi index): its stage folder and the index inside it
INDEX_DIR = "index"
INDEX_NAME = "ivf_flat"
#: where the index is, relative to the run directory (as recorded in the embedding's metadata)
INDEX_RELATIVE_URI = f"{INDEX_DIR}/{INDEX_NAME}"

# census layout
CENSUS_INFO = "census_info"
CENSUS_DATA = "census_data"
MEASUREMENT = "RNA"
X_RAW = "raw"

# environment
CACHE_ENV = "CENSUS_SCVI_CACHE"

# embed stage internals
LATENT_LIBSIZE_FILE = "latent-libsize.npy"
EMBED_LOCK_FILE = ".lock"
#: The lock file that makes one process the writer of a stage folder (rundir.hold_lock).
STAGE_LOCK = ".writer.lock"
#: The lock file of a whole run directory (census-scvi run) and of a census being built.
RUN_LOCK = ".census-scvi.lock"
EMBEDDING_INFO_KEY = "CxG_embedding_info"

# scib-metrics metric switches (BioConservation / BatchCorrection field names, scib-metrics 0.5)
BIO_METRICS = (
    "isolated_labels",
    "nmi_ari_cluster_labels_leiden",
    "nmi_ari_cluster_labels_kmeans",
    "silhouette_label",
    "clisi_knn",
)
BATCH_METRICS = ("bras", "ilisi_knn", "kbet_per_label", "graph_connectivity", "pcr_comparison")
