"""Preparing a job: what a user submitted (model name, dataset name, raw params)
turned into a `PreparedJob`, refusing anything wrong before a model loads. It does
not import torch, so the server calls it at submit time; the worker and the CLI call
it again before running (engine/evaluation.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from backend.common.config import Settings
from backend.datasets.base import DataContext, Dataset, DatasetParams
from backend.datasets.registry import get_dataset
from backend.engine.contracts import ModelInfo, ModelSpec
from backend.runners.base import Runner
from backend.runners.models import resolve_model
from backend.runners.registry import get_runner


def _never() -> bool:
    return False


@dataclass(frozen=True)
class PreparedJob:
    """A job validated once, with everything it runs with: its model, what is known of
    it, the dataset (made with the job's data context) and its parameters with every
    server ceiling applied, the runner's checked options, and the worker's part (GPUs,
    data-parallel shard, stop signal). Built by `prepare`, never changed afterwards."""

    spec: ModelSpec
    info: ModelInfo
    dataset: Dataset
    params: DatasetParams
    api: Any = None
    """The runner's options (ApiOptions for an `openai:` model, base URL filled in from
    the settings by its check_job)."""
    api_key: str | None = None
    num_gpus: int = 1
    """GPUs the job asked for (a model sharded across them)."""
    should_stop: Callable[[], bool] = field(default=_never, repr=False)
    """True once the job is cancelled, timed out or its worker stops. Runners that wait
    on something outside (an API model's requests) check it and raise
    contracts.Stopped."""
    shard: tuple[int, int] | None = None
    """(k, n): a shard of a data-parallel job, evaluating the items whose idx % n == k."""

    def stopping_with(self, should_stop: Callable[[], bool]) -> PreparedJob:
        """The same job with the stop signal of the sink that records it (the worker
        makes its sink after preparing the job)."""
        return replace(self, should_stop=should_stop)

    @property
    def runner(self) -> type[Runner]:
        """The runner class that serves the job's model (backend.runners.registry)."""
        return get_runner(self.spec.runner)


def prepare(model: str, dataset: str, raw_params: dict[str, Any] | None,
            settings: Settings, confine: bool = True, api: Any = None,
            api_key: str | None = None, fetch_data: bool = False,
            data_progress: Any = None, num_gpus: int = 1,
            shard: tuple[int, int] | None = None) -> PreparedJob:
    """Resolve and check a job without loading anything.

    With `confine` (jobs from the API and the queue) model folders must lie under
    LBS_MODEL_DIRS and data paths under LBS_DATASETS_DIR; the command line, run by
    the machine's own user, passes False. Raises UnknownDataset, ModelNotFound
    (ModelPathRefused), pydantic.ValidationError, ParamError (PathRefused) or
    JobFieldError (JobFieldRefused for a path outside the allowed folders). `api`
    and `api_key` are the runner's options (ApiOptions, or their stored dict, for
    `openai:` models); the model's runner checks them (Runner.check_job). `num_gpus`
    and `shard` are the worker's part: the GPUs the model is sharded over, the share
    of a data-parallel job's items.

    Data the dataset reads from the hub (datasets/hub.py) is fetched here only with
    `fetch_data` (workers, the CLI) and LBS_ALLOW_DATA_DOWNLOAD, reporting bytes to
    `data_progress`; without `fetch_data` (the server) missing data that a worker may
    fetch lets the job through, unchecked until then, and otherwise is a DataMissing
    ParamError carrying how to get it.
    """
    from backend.datasets.hub import DataAccess, FetchPending

    access = DataAccess(allow_download=settings.allow_data_download, fetch_now=fetch_data,
                        offline=settings.hub_offline, progress=data_progress)
    ds = get_dataset(dataset, DataContext.of(settings, access, confine))
    params = ds.parse_params(raw_params)
    spec = resolve_model(model, settings, confine=confine)
    draft = PreparedJob(spec, ModelInfo(spec.name, None), ds, params, api, api_key,
                        num_gpus=num_gpus, shard=shard)
    options = draft.runner.check_job(draft, settings, confine)
    checked = replace(draft, api=options.api, api_key=options.api_key)
    info = checked.runner.model_info(checked)
    try:
        ds.check(params, info)
    except FetchPending:
        pass  # the worker fetches the data, then checks again before building items
    return replace(checked, info=info, params=ds.check_ceilings(params, info, settings))
