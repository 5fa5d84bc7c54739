"""Locations of the real data samples in ../shared/data (CI has them beside the clone)."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
ENWIK8_SAMPLE = SHARED_DATA / "enwik8-sample" / "enwiki_sample.xml"
PG19_SAMPLE = SHARED_DATA / "pg19-sample"
PG19_VOCAB = 1000  # the SentencePiece size of the `pg19_train` fixture (conftest.py)

requires_shared_data = pytest.mark.skipif(
    not ENWIK8_SAMPLE.exists() or not PG19_SAMPLE.exists(), reason="../shared/data is not beside the checkout"
)
QA_DATA = SHARED_DATA / "qa"
SQUAD2_TRAIN = QA_DATA / "squad2-train.json"
SQUAD2_DEV = QA_DATA / "squad2-dev.json"
LONG_TRAIN = QA_DATA / "long-train.json"
LONG_DEV = QA_DATA / "long-dev.json"

requires_qa_data = pytest.mark.skipif(not SQUAD2_DEV.exists(), reason="../shared/data/qa is not beside the checkout")
