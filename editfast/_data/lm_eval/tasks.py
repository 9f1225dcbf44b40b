"""Documents of editfast's bundled tasks for the lm-eval task files beside this file (their
``custom_dataset``): the same rows ``editfast eval`` reads, offline, as a validation split."""

import datasets

from editfast.eval.tasks import get_task


def _validation(name: str) -> datasets.DatasetDict:
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(get_task(name).load())})


def rte(**_metadata) -> datasets.DatasetDict:
    return _validation("rte")


def sst2(**_metadata) -> datasets.DatasetDict:
    return _validation("sst2")
