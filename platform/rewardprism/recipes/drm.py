"""The DRM recipe: embed a dataset, decompose its training split into a head set, evaluate it on the test split.

    python train_drm.py --config configs/drm_synthetic.yaml [--override n_components=20 ...]

torchtune's recipe shape over the components: `setup` checks what the config names and joins or starts Ray;
`run` embeds with Ray Data actors (`rewardprism.embed_ray`, resumable: shards already there for the same pairs
are kept), decomposes the training split in Ray tasks, one per shard (`rewardprism.drm_ray`), builds the head set
(`rewardprism.calibrate.fit_head_set`: population head, calibrated hyperprior) and evaluates it on the test split
(`rewardprism.evaluate.drm_report`); `save` writes the head set, report.md and report.json; `cleanup` leaves a
Ray cluster the recipe started. With `use_ray: false` everything runs in this process.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rewardprism.adapt import METHODS
from rewardprism.calibrate import fit_head_set
from rewardprism.config import ConfigError, output_path
from rewardprism.data import PreferencePair, is_data_file, iter_pairs
from rewardprism.drm_ray import decompose_folder
from rewardprism.embed import EmbeddingSet
from rewardprism.evaluate import Split, drm_report, to_markdown
from rewardprism.recipes import connect_ray
from rewardprism.sources import open_dataset

log = logging.getLogger(__name__)


@dataclass
class DrmConfig:
    dataset: str = "synthetic"  # 'synthetic', a file, a folder of files or a Hugging Face dataset name
    dataset_files: int | None = None  # only the first N files of a folder, sorted (the reference: 6 generators)
    group: str | None = None  # group of pairs that carry none, e.g. harmless
    limit: int | None = None  # only the first N pairs
    skip_bad_rows: bool = False  # leave out malformed rows instead of stopping
    synthetic_per_user: int = 300  # pairs per simulated user, for 'synthetic'
    synthetic_seed: int = 0
    backbone: str = "minilm"
    max_length: int = 192  # tokens per text (the reference: 192)
    shard_size: int = 4096  # pairs per embedding shard (and per decomposition task)
    embeddings: str | None = None  # embedding folder; default <output_dir>/embeddings. Reused shard by shard.
    output_dir: str = "runs/drm"
    n_components: int = 50  # k principal directions → 2k heads
    population_head: bool = True  # Bradley-Terry head 0 and default profile; else the mean profile
    test_fraction: float = 0.5
    split_seed: int = 0
    n_values: list[int] = field(default_factory=lambda: [5, 15, 50])  # adaptation pairs per group
    seeds: int = 20
    methods: list[str] = field(default_factory=lambda: ["hyre", "default"])
    use_prior: bool = True  # adapt from the head set's default profile (false: from zero, few-shot alone)
    adapt_from: str | None = None  # embeddings of another annotator on the same prompts (cross-annotator rows)
    num_actors: int = 1  # Ray Data embedding actors
    use_ray: bool = True

    def __post_init__(self) -> None:
        if self.n_components < 1:
            raise ConfigError("n_components", f"must be at least 1, got {self.n_components}")
        if not self.n_values or min(self.n_values) < 1:
            raise ConfigError("n_values", f"must be positive adaptation pair counts, got {self.n_values}")
        if self.seeds < 1:
            raise ConfigError("seeds", f"must be at least 1, got {self.seeds}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError("methods", f"unknown {bad}; use some of {', '.join(METHODS)}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError("test_fraction", f"must be in (0, 1), got {self.test_fraction}")


class DrmRecipe:
    """setup → run → save → cleanup; each step checks the values it uses."""

    def __init__(self, config: DrmConfig):
        self.config = config
        self.out = output_path(config.output_dir, "output_dir")
        self.embeddings = Path(config.embeddings) if config.embeddings else self.out / "embeddings"
        self.started_ray = False

    def setup(self) -> None:
        c = self.config
        if c.adapt_from is not None and not (Path(c.adapt_from) / "index.json").exists():
            raise ConfigError("adapt_from", f"{c.adapt_from} is not an embedding folder; embed it first")
        if c.use_ray:
            self.started_ray = connect_ray({"TOKENIZERS_PARALLELISM": "false"})

    def pairs(self) -> Iterator[PreferencePair]:
        """The dataset as a stream (a folder cut to its first `dataset_files` files, sorted)."""
        c = self.config
        if c.dataset_files is None:
            return open_dataset(c.dataset, limit=c.limit, group=c.group, skip_bad_rows=c.skip_bad_rows,
                                synthetic_per_user=c.synthetic_per_user, seed=c.synthetic_seed)
        folder = Path(c.dataset)
        if not folder.is_dir():
            raise ConfigError("dataset_files", f"needs a folder as dataset, got {c.dataset}")
        files = sorted(p for p in folder.iterdir() if p.is_file() and is_data_file(p))[:c.dataset_files]
        stream = itertools.chain.from_iterable(iter_pairs(f, group=c.group, skip_bad_rows=c.skip_bad_rows)
                                               for f in files)
        return itertools.islice(stream, c.limit)

    def embed(self) -> None:
        """Embed the dataset into `self.embeddings`; shards already there for the same pairs are kept."""
        from rewardprism.backbone import load_backbone
        from rewardprism.embed import embed_pairs
        from rewardprism.features import FeatureSpec

        c = self.config
        if c.use_ray:
            from rewardprism.embed_ray import embed_pairs_ray

            probe = load_backbone(c.backbone, max_length=c.max_length, device="cpu")
            report = embed_pairs_ray(self.pairs(), FeatureSpec.of(probe), self.embeddings, dim=probe.dim,
                                     num_actors=c.num_actors, shard_size=c.shard_size, dataset=c.dataset,
                                     progress=False)
        else:
            report = embed_pairs(self.pairs(), load_backbone(c.backbone, max_length=c.max_length), self.embeddings,
                                 shard_size=c.shard_size, dataset=c.dataset, progress=False)
        log.info("embeddings: %d pairs, %d shards written, %d reused", report.n_pairs, report.shards_written,
                 report.shards_reused)

    def run(self) -> None:
        c = self.config
        self.embed()
        embedded = EmbeddingSet(self.embeddings)
        data = Split.of(*embedded.load(), embedded.pairs(), c.test_fraction, c.split_seed)
        decomposition = decompose_folder(self.embeddings, c.n_components, rows=data.train, use_ray=c.use_ray)
        self.head_set = fit_head_set(decomposition, *data.training(), population_head=c.population_head,
                                     features=embedded.features, split=data.fitted_on("train"),
                                     dataset=f"{c.dataset} [train split]")
        adapt_from = None
        if c.adapt_from is not None:
            other = EmbeddingSet(c.adapt_from)
            adapt_from = Split.of(*other.load(), other.pairs(), c.test_fraction, c.split_seed)
        self.report = drm_report(data, self.head_set, n_values=c.n_values, methods=c.methods, seeds=range(c.seeds),
                                 adapt_from=adapt_from, use_prior=c.use_prior)

    def save(self) -> None:
        self.head_set.save(self.out / "heads")
        (self.out / "report.md").write_text(to_markdown(self.report))
        (self.out / "report.json").write_text(json.dumps({"config": dataclasses.asdict(self.config),
                                                          **self.report}, indent=1))

    def cleanup(self) -> None:
        if self.started_ray:
            import ray

            ray.shutdown()
