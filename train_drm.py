"""Embed → decompose → evaluate: a decomposed reward model and the paper's tables, as one recipe.

    python train_drm.py --config configs/drm_minilm_alpaca_gpt4.yaml [--n_components 20 ...]
    python train_drm.py --dataset synthetic --backbone minilm --output_dir runs/drm-synthetic
    ray job submit --working-dir . -- python train_drm.py --config configs/drm_minilm_alpaca_gpt4.yaml

Every field of `DrmConfig` is a flag (`--field value`, values read as YAML) that overrides the config file.
Without a running cluster `ray.init()` starts a local one; under `ray job submit` (RAY_ADDRESS) it joins that.
The recipe, in torchtune's shape: setup (check the config, read the dataset, start Ray), run (embed with Ray
Data actors, resumable; decompose the training split in Ray tasks, one per shard; fit the population head;
evaluate on the test split), save (head set, report.md, report.json), cleanup (leave Ray).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rewardprism.data import DataError, PreferencePair
from rewardprism.vrm import ConfigError

log = logging.getLogger("rewardprism.train_drm")


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


def load_config(path: str | None, overrides: dict[str, Any]) -> DrmConfig:
    """A YAML file (optional) plus overrides, checked against `DrmConfig`'s fields and their types."""
    from rewardprism.train import from_dict, read_config_file

    return from_dict(DrmConfig, {**(read_config_file(path) if path else {}), **overrides}, "")


class DrmRecipe:
    """setup → run → save → cleanup; each step checks the values it uses."""

    def __init__(self, config: DrmConfig):
        from rewardprism.train import output_path

        self.config = config
        self.out = output_path(config.output_dir, "output_dir")
        self.embeddings = Path(config.embeddings) if config.embeddings else self.out / "embeddings"
        self.started_ray = False

    def setup(self) -> None:
        from rewardprism.adapt import METHODS

        c = self.config
        if c.n_components < 1:
            raise ConfigError("n_components", f"must be at least 1, got {c.n_components}")
        if not c.n_values or min(c.n_values) < 1:
            raise ConfigError("n_values", f"must be positive adaptation pair counts, got {c.n_values}")
        if c.seeds < 1:
            raise ConfigError("seeds", f"must be at least 1, got {c.seeds}")
        bad = [m for m in c.methods if m not in METHODS]
        if bad or not c.methods:
            raise ConfigError("methods", f"unknown {bad}; use some of {', '.join(METHODS)}")
        if not 0 < c.test_fraction < 1:
            raise ConfigError("test_fraction", f"must be in (0, 1), got {c.test_fraction}")
        if c.adapt_from is not None and not (Path(c.adapt_from) / "index.json").exists():
            raise ConfigError("adapt_from", f"{c.adapt_from} is not an embedding folder; embed it first")
        if c.use_ray:
            import ray

            self.started_ray = not ray.is_initialized()
            ray.init(ignore_reinit_error=True, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})

    def pairs(self) -> Iterator[PreferencePair]:
        """The dataset as a stream (a folder cut to its first `dataset_files` files, sorted)."""
        from rewardprism.cli import load_dataset_arg
        from rewardprism.data import is_data_file, iter_pairs

        c = self.config
        if c.dataset_files is None:
            return load_dataset_arg(c.dataset, limit=c.limit, group=c.group, skip_bad_rows=c.skip_bad_rows,
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

        c = self.config
        if c.use_ray:
            from rewardprism.embed_ray import embed_pairs_ray

            dim = load_backbone(c.backbone, max_length=c.max_length, device="cpu").dim
            report = embed_pairs_ray(self.pairs(), c.backbone, self.embeddings, dim=dim, num_actors=c.num_actors,
                                     shard_size=c.shard_size, max_length=c.max_length, dataset=c.dataset,
                                     progress=False)
        else:
            report = embed_pairs(self.pairs(), load_backbone(c.backbone, max_length=c.max_length), self.embeddings,
                                 shard_size=c.shard_size, dataset=c.dataset, progress=False)
        log.info("embeddings: %d pairs, %d shards written, %d reused", report.n_pairs, report.shards_written,
                 report.shards_reused)

    def run(self) -> None:
        from rewardprism.drm import build_head_set, fit_population_head
        from rewardprism.drm_ray import decompose_folder
        from rewardprism.embed import EmbeddingSet
        from rewardprism.evaluate import Split, calibrate_hyperprior, drm_report

        c = self.config
        self.embed()
        data_set = EmbeddingSet(self.embeddings)
        data = Split.of(*data_set.load(), data_set.pairs(), c.test_fraction, c.split_seed)
        decomposition = decompose_folder(self.embeddings, c.n_components, rows=data.train, use_ray=c.use_ray)
        chosen, rejected, pairs = data.training()
        population = fit_population_head(chosen, rejected) if c.population_head else None
        self.heads = build_head_set(decomposition, population, backbone=data_set.backbone,
                                    dataset=f"{c.dataset} [train split]")
        calibrate_hyperprior(self.heads, chosen, rejected, pairs)
        adapt_from = None
        if c.adapt_from is not None:
            other = EmbeddingSet(c.adapt_from)
            adapt_from = Split.of(*other.load(), other.pairs(), c.test_fraction, c.split_seed)
        self.report = drm_report(data, self.heads, n_values=c.n_values, methods=c.methods, seeds=range(c.seeds),
                                 adapt_from=adapt_from, use_prior=c.use_prior)

    def save(self) -> None:
        from rewardprism.evaluate import to_markdown

        self.heads.save(self.out / "heads")
        (self.out / "report.md").write_text(to_markdown(self.report))
        (self.out / "report.json").write_text(json.dumps({"config": dataclasses.asdict(self.config),
                                                          **self.report}, indent=1))

    def cleanup(self) -> None:
        if self.started_ray:
            import ray

            ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config, e.g. configs/drm_minilm_alpaca_gpt4.yaml")
    for f in dataclasses.fields(DrmConfig):
        parser.add_argument(f"--{f.name}", type=yaml.safe_load, default=argparse.SUPPRESS, metavar="VALUE")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    try:
        recipe = DrmRecipe(load_config(args.pop("config", None), args))
        recipe.setup()
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    try:
        recipe.run()
        recipe.save()
    except DataError as exc:
        parser.exit(2, f"error: dataset: {exc}\n")
    except ValueError as exc:  # a value the data makes impossible: n over a group's size, k over the dimension
        parser.exit(2, f"error: {exc}\n")
    finally:
        recipe.cleanup()
    print(f"head set and report in {recipe.out}")
    overall = {row["label"]: round(row["reference"]["overall"][0], 4) for row in recipe.report["rows"]}
    print(json.dumps(overall, indent=1))


if __name__ == "__main__":
    main()
