"""The core types every stage shares: the plan, the unified dataset layout and the failure records."""

from __future__ import annotations

import json
import pickle

import pytest
from test_preprocess import ANISO_CASES, write_unified_dataset

from aeval.data.planner import plan_datasets, plan_hash
from aeval.dataset import UnifiedDataset
from aeval.errors import CaseError, CaseFailure, FailureLog
from aeval.plan import Plan


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("core") / "unified"
    write_unified_dataset(root, "aniso", ANISO_CASES)
    return root, plan_datasets(["aniso"], root, root.parent / "pre")


def test_plan_json_round_trip(planned):
    """plans.json -> Plan -> dict is the file's content, key for key, and its hash still checks out."""
    _, plan_dir = planned
    data = json.loads((plan_dir / "plans.json").read_text())
    plan = Plan.read(plan_dir / "plans.json")
    assert plan.to_dict() == data and Plan.from_dict(plan.to_dict()) == plan
    assert plan.hash == plan_hash(plan.to_dict())
    assert plan.modalities == {"CT"} and plan.ct_threshold == -500.0 and len(plan.pool_op_kernel_sizes) == 5
    assert plan.get("num_training_cases") == 4 and pickle.loads(pickle.dumps(plan)) == plan


def test_a_bad_plan_is_one_line_naming_the_file(planned, tmp_path):
    _, plan_dir = planned
    data = json.loads((plan_dir / "plans.json").read_text())
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({k: v for k, v in data.items() if k != "patch_size"}))
    with pytest.raises(CaseError, match=r"missing\.json: not an aeval plan \(missing patch_size\)"):
        Plan.read(missing)
    malformed = tmp_path / "malformed.json"
    malformed.write_text(json.dumps({**data, "target_spacing": [1.0, 2.0]}))
    with pytest.raises(CaseError, match=r"malformed\.json: malformed plan"):
        Plan.read(malformed)
    with pytest.raises(CaseError, match="unreadable plan"):
        Plan.read(tmp_path / "absent.json")


def test_unified_dataset_reads_the_layout(planned):
    root, _ = planned
    dataset = UnifiedDataset.at(root, "aniso")
    assert dataset.exists() and dataset.info() == {"name": "aniso", "modality": "CT", "label_system": "flare22"}
    cases = dataset.cases("train")
    assert cases == [f"aniso_{i:03d}" for i in range(4)] and dataset.cases("test") == []
    image, label = dataset.case_files(cases[0])
    assert image == root / "aniso" / "imagesTr" / "aniso_000_0000.nii.gz" and image.exists() and label.exists()
    assert dataset.label(cases[0], "test") == root / "aniso" / "labelsTs" / "aniso_000.nii.gz"
    with pytest.raises(ValueError, match="unknown split 'val'"):
        dataset.cases("val")
    with pytest.raises(CaseError, match="no dataset.json"):
        UnifiedDataset.at(root, "absent").info()


def test_unified_dataset_writes_what_it_reads(tmp_path):
    dataset = UnifiedDataset(tmp_path / "pl")
    dataset.write_metadata({"train": ["a", "b"]}, name="pl", description="test", modality="MR",
                           label_system="flare22", labelled=True, pseudo_labels={"complete": True})
    assert dataset.cases("train") == ["a", "b"] and dataset.cases("test") == []
    meta = dataset.meta
    assert meta["numTraining"] == 2 and meta["labels"]["liver"] == 1 and meta["pseudo_labels"] == {"complete": True}
    assert dataset.modality == "MR" and dataset.label_system == "flare22"


def test_failures_are_data_and_only_input_problems_are_caught():
    failures = FailureLog(quiet=True)
    with failures.case("a.nii.gz"):
        raise ValueError("3-D image expected")
    with failures.case("b.nii.gz"):
        raise CaseError("b_0000.nii.gz", "unreadable")
    assert failures.records == [CaseFailure("a.nii.gz", "ValueError: 3-D image expected"),
                                CaseFailure("b_0000.nii.gz", "unreadable")]
    assert pickle.loads(pickle.dumps(failures.records)) == failures.records and failures.exit_code() == 2
    with pytest.raises(RuntimeError, match="CUDA out of memory"), failures.case("c.nii.gz"):
        raise RuntimeError("CUDA out of memory")  # a bug or a crash is not a bad input: it propagates
    assert len(failures.records) == 2
