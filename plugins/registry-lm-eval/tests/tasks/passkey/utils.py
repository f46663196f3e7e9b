"""The toy pass-key task's data: passkey.jsonl beside this file, as the `test` split."""

from pathlib import Path


def load(**kwargs):
    """The JSONL as a DatasetDict with one `test` split (lm-eval passes the task's metadata as keyword arguments)."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).with_name("passkey.jsonl"))})


def tokens_256(dataset):
    """The prompts of 256 tokens."""
    return dataset.filter(lambda doc: doc["tokens"] == 256)


def tokens_512(dataset):
    """The prompts of 512 tokens."""
    return dataset.filter(lambda doc: doc["tokens"] == 512)
