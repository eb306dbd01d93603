"""What every job needs to find its inputs: the resolved SpinRun, its store, and the model of an iteration."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from spin_core import layout
from spin_core.errors import SpinError
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
        """Local folder holding M_{t-1} (the SFT model for t == 1, else the checkpoint of iteration t-1)."""
        self.check_iteration(t)
        storage = self.run.spec.storage
        if t == 1:
            try:
                return fetch_input(self.run.spec.model.uri, storage.endpoint, storage.region)
            except NotPublished as e:
                raise SpinError(f"spec.model.uri: {e}") from None
        key = layout.checkpoint(t - 1)
        if not self.store.is_published(key):
            raise NotPublished(
                f"the model of iteration {t - 1} ({self.store.uri_of(key)}) is not published: "
                f"iteration {t - 1} has not finished training"
            )
        return self.store.fetch(key)

    def fetch_dataset(self) -> Path:
        """Local path of the dataset file."""
        storage = self.run.spec.storage
        try:
            return fetch_input(self.run.spec.dataset.uri, storage.endpoint, storage.region)
        except NotPublished as e:
            raise SpinError(f"spec.dataset.uri: {e}") from None
