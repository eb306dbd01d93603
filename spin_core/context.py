"""What every job needs to find its inputs: the resolved SpinRun, its store, and the model of an iteration."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from spin_core import layout
from spin_core.data import Example, load_examples
from spin_core.errors import SpinError
from spin_core.inputs import check_model_folder, check_tensor_parallel, check_vllm_serves
from spin_core.resource import load, parse
from spin_core.spec import SpinRun
from spin_core.store import NotPublished, Store, fetch_input


@dataclass
class RunContext:
    """A SpinRun plus the store its artefacts live in."""

    run: SpinRun

    @classmethod
    def from_file(cls, path: str | Path) -> RunContext:
        """Load the resolved spec a job is handed (YAML or JSON; the ConfigMap or `run.json`)."""
        return cls(load(path))

    @classmethod
    def from_document(cls, document: dict) -> RunContext:
        return cls(parse(document))

    @cached_property
    def store(self) -> Store:
        storage = self.run.spec.storage
        return Store.open(storage.uri, storage.endpoint, storage.region)

    def check_iteration(self, t: int) -> None:
        if not 1 <= t <= self.run.spec.iterations:
            raise SpinError(f"iteration {t} is out of range: this run has iterations 1..{self.run.spec.iterations}")

    def model_uri(self, t: int) -> str:
        """URI of M_{t-1}: the model that generates in iteration t and that iteration t starts training from."""
        self.check_iteration(t)
        return self.run.spec.model.uri if t == 1 else self.store.uri_of(layout.checkpoint(t - 1))

    def fetch_model(self, t: int) -> Path:
        """Local folder holding M_{t-1} (the SFT model for t == 1, else the checkpoint of iteration t-1), checked
        (`inputs.check_model_folder`; and the head dim when the run uses vLLM) before any engine sees it."""
        self.check_iteration(t)
        storage = self.run.spec.storage
        if t == 1:
            try:
                folder = fetch_input(self.run.spec.model.uri, storage.endpoint, storage.region)
            except NotPublished as e:
                raise SpinError(f"spec.model.uri: {e}") from None
        else:
            key = layout.checkpoint(t - 1)
            if not self.store.is_published(key):
                raise NotPublished(
                    f"the model of iteration {t - 1} ({self.store.uri_of(key)}) is not published: "
                    f"iteration {t - 1} has not finished training"
                )
            folder = self.store.fetch(key)
        config = check_model_folder(folder, self.model_uri(t))
        if (field := self.vllm_field()) is not None:
            check_vllm_serves(config, self.model_uri(t), field)
        if self.run.spec.generation.backend == "vllm":
            check_tensor_parallel(config, self.model_uri(t), self.run.spec.generation.gpus_per_shard)
        return folder

    def vllm_field(self) -> str | None:
        """The spec field that makes this run use vLLM (generation or evaluation backend), if any."""
        spec = self.run.spec
        if spec.generation.backend == "vllm":
            return "generation.backend"
        if spec.evaluation is not None and spec.evaluation.backend == "vllm":
            return "evaluation.backend"
        return None

    def fetch_dataset(self) -> Path:
        """Local path of the dataset file."""
        storage = self.run.spec.storage
        try:
            return fetch_input(self.run.spec.dataset.uri, storage.endpoint, storage.region)
        except NotPublished as e:
            raise SpinError(f"spec.dataset.uri: {e}") from None

    def _load(self, dataset, field: str = "spec.dataset.uri") -> list[Example]:
        storage = self.run.spec.storage
        try:
            path = fetch_input(dataset.uri, storage.endpoint, storage.region)
        except NotPublished as e:
            raise SpinError(f"{field}: {e}") from None
        return load_examples(path, dataset, source=dataset.uri).examples

    def training_examples(self) -> list[Example]:
        """The dataset's examples (every row read and checked), minus the held-out ones when
        evaluation.heldoutFraction is set."""
        return self.without_heldout(self._load(self.run.spec.dataset))

    def without_heldout(self, examples: list[Example]) -> list[Example]:
        """Drop the examples evaluation.heldoutFraction reserves (nothing when it is not set)."""
        ev = self.run.spec.evaluation
        if ev is None or ev.heldout_fraction == 0:
            return examples
        kept = [e for e in examples if not is_heldout(e.id, ev.heldout_fraction)]
        if not kept:
            raise SpinError(f"evaluation.heldoutFraction {ev.heldout_fraction} leaves no training example")
        return kept

    def heldout_examples(self) -> list[Example]:
        """The held-out examples evaluation uses (at most evaluation.maxSamples); an empty split is an error."""
        ev = self.run.spec.evaluation
        if ev is None:
            raise SpinError("spec.evaluation is not set")
        if ev.dataset is not None:
            examples = self._load(ev.dataset, "spec.evaluation.dataset.uri")
            where = f"evaluation.dataset {ev.dataset.uri}"
        else:
            examples = [e for e in self._load(self.run.spec.dataset) if is_heldout(e.id, ev.heldout_fraction)]
            where = f"evaluation.heldoutFraction {ev.heldout_fraction} of {self.run.spec.dataset.uri}"
        if not examples:
            raise SpinError(f"{where}: the held-out split is empty; raise the fraction or give more data")
        return examples[: ev.max_samples]


def is_heldout(example_id: str, fraction: float) -> bool:
    """Deterministic held-out membership from the prompt id alone (stable across shards, runs and machines)."""
    bucket = int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:4], "big") / 2**32
    return bucket < fraction
