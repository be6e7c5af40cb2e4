"""Label systems against the facts of DESIGN §3, and the real label files."""

import nibabel as nib
import numpy as np
import pytest
from conftest import REAL, needs_real

from aeval import labels as L

# Independent reference: the numbering as DESIGN §3 states it, organ name -> id per system.
FACTS = {
    "flare22": {"liver": 1, "kidney_right": 2, "spleen": 3, "pancreas": 4, "aorta": 5, "inferior_vena_cava": 6,
                "adrenal_gland_right": 7, "adrenal_gland_left": 8, "gallbladder": 9, "esophagus": 10,
                "stomach": 11, "duodenum": 12, "kidney_left": 13},
    "amos": {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "esophagus": 5, "liver": 6,
             "stomach": 7, "aorta": 8, "inferior_vena_cava": 9, "pancreas": 10, "adrenal_gland_right": 11,
             "adrenal_gland_left": 12, "duodenum": 13, "urinary_bladder": 14, "prostate_uterus": 15},
    "word": {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4, "stomach": 5, "gallbladder": 6,
             "esophagus": 7, "pancreas": 8, "duodenum": 9, "colon": 10, "small_bowel": 11, "adrenal_glands": 12,
             "rectum": 13, "urinary_bladder": 14, "femur_head_left": 15, "femur_head_right": 16},
    "btcv": {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "esophagus": 5, "liver": 6,
             "stomach": 7, "aorta": 8, "inferior_vena_cava": 9, "portal_vein_and_splenic_vein": 10, "pancreas": 11,
             "adrenal_gland_right": 12, "adrenal_gland_left": 13},
    "totalseg_v1": {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5, "stomach": 6,
                    "aorta": 7, "inferior_vena_cava": 8, "pancreas": 10, "adrenal_gland_right": 11,
                    "adrenal_gland_left": 12, "esophagus": 42, "duodenum": 56},
    "totalseg_v2": {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5, "stomach": 6,
                    "pancreas": 7, "adrenal_gland_right": 8, "adrenal_gland_left": 9, "esophagus": 15,
                    "duodenum": 19, "aorta": 52, "inferior_vena_cava": 63},
    "totalseg_mr": {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5, "stomach": 6,
                    "pancreas": 7, "adrenal_gland_right": 8, "adrenal_gland_left": 9, "esophagus": 12,
                    "duodenum": 14, "aorta": 23, "inferior_vena_cava": 24},
    "totalseg_104_alpha": {"liver": 40, "kidney_right": 39, "kidney_left": 38, "spleen": 77, "pancreas": 46,
                           "gallbladder": 15, "esophagus": 11, "stomach": 78},
}
AEVAL8 = {"liver": 1, "kidney_right": 2, "spleen": 3, "pancreas": 4, "gallbladder": 5, "esophagus": 6,
          "stomach": 7, "kidney_left": 8}
SIZES = {"flare22": 13, "amos": 15, "word": 16, "btcv": 13, "totalseg_v1": 104, "totalseg_v2": 117,
         "totalseg_mr": 50, "totalseg_104_alpha": 104, "aeval8": 8, "aeval10": 10}


@pytest.mark.parametrize("system", sorted(FACTS))
def test_numbering_matches_design(system):
    table = L.get_system(system)
    for organ, label_id in FACTS[system].items():
        assert table.names[label_id] == organ


@pytest.mark.parametrize("system", sorted(SIZES))
def test_system_sizes(system):
    assert len(L.get_system(system).names) == SIZES[system]


@pytest.mark.parametrize("system", sorted(FACTS))
def test_to_aeval8_maps_by_name_and_zeroes_the_rest(system):
    size = L.get_system(system).max_id + 1
    source = np.arange(size)
    out = L.to_aeval8(source, system)
    assert out.dtype == np.uint8
    expected = np.zeros(size, dtype=np.uint8)
    for organ, label_id in FACTS[system].items():
        expected[label_id] = AEVAL8.get(organ, 0)
    assert (out == expected).all()
    assert set(np.unique(out)) <= set(range(9))


def test_to_aeval10_adds_adrenals_and_drops_word_merged_adrenal():
    assert L.to_aeval10(np.array([7, 8, 1]), "flare22").tolist() == [9, 10, 1]
    assert L.to_aeval10(np.array([12, 1]), "word").tolist() == [0, 1]
    assert L.to_aeval10(np.array([11, 12]), "amos").tolist() == [9, 10]


def test_flare22_sets_word_adrenal_is_both_adrenals():
    sets = L.flare22_sets("word")
    assert sets[12] == {7, 8}
    assert sets[3] == {13} and sets[4] == {2}
    assert 10 not in sets  # colon is not a FLARE22 class


def test_annotated_and_background_sets():
    assert L.annotated_classes("word") == set(range(1, 14)) - {5, 6}
    assert L.background_set("word") == {0, 5, 6}
    assert L.background_set("btcv") == {0, 12}
    assert L.background_set("amos") == {0}
    assert L.background_set("totalseg_v1") == {0}


def test_hard_flare22_targets():
    assert L.to_flare22(np.array([6, 1, 13, 14]), "amos").tolist() == [1, 3, 12, 0]
    assert L.to_flare22(np.array([12]), "word").tolist() == [0]  # merged adrenal is not one class


@pytest.mark.parametrize("values,system,bad", [([0, 3, 16], "amos", "16"), ([0, 105, 200], "totalseg_v1", "105, 200"),
                                                 ([0, -1], "flare22", "-1"), ([0, 51], "totalseg_mr", "51")])
def test_unknown_values_raise_naming_system_and_values(values, system, bad):
    with pytest.raises(ValueError, match=rf"values {bad} .*'{system}'"):
        L.to_aeval8(np.array(values), system)


def test_unknown_system_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown label system 'amos22'"):
        L.get_system("amos22")


def _world_centroid(img, mask):
    idx = np.argwhere(mask)
    return img.affine[:3, :3] @ idx.mean(0) + img.affine[:3, 3]


@needs_real
@pytest.mark.parametrize("name,system", [("example_seg", "totalseg_v2"), ("example_seg_mr", "totalseg_mr"),
                                          ("example_seg_fast_force_split", "totalseg_v2"),
                                          ("amos_0013_label", "amos")])
def test_real_label_files_map_to_the_8_organs(name, system):
    img = nib.load(str(REAL / f"{name}.nii.gz"))
    native = np.asanyarray(img.dataobj)
    mapped = L.to_aeval8(native, system)
    native_ids = {organ: L.get_system(system).id_of(organ) for organ in AEVAL8}
    for organ, aeval_id in AEVAL8.items():
        assert (mapped == aeval_id).sum() == (native == native_ids[organ]).sum()
    # World x grows to the patient's right in RAS+: liver and right kidney right, spleen and left kidney left,
    # whatever the file's voxel orientation (RAS for the CT, LPS for the MR, LAS for AMOS).
    x = {organ: _world_centroid(img, mapped == i)[0] for organ, i in AEVAL8.items() if (mapped == i).any()}
    assert x["liver"] > 0 > x["spleen"]
    assert x["kidney_right"] > 0 > x["kidney_left"]
