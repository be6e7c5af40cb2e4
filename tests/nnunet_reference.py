"""Builders for nnU-Net parity checks: a valid nnU-Net v2 model folder (plans.json, dataset.json,
fold_0/checkpoint_final.pth) and v1 files around one STU-Net, and nnU-Net v2 itself run on a file.

Used by tests/test_nnunet_parity.py and experiments/benchmarks/nnunet_parity.py. nnunetv2 is imported
lazily: only the reference functions need it."""

from __future__ import annotations

import json
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from aeval.labels import FLARE22_ORGANS
from aeval.models.stunet import build_stunet

CT_STATS = {"max": 1500.0, "mean": 60.0, "median": 55.0, "min": -1000.0, "percentile_00_5": -150.0,
            "percentile_99_5": 300.0, "std": 80.0}
LABELS = {"background": 0, **{name: i + 1 for i, name in enumerate(FLARE22_ORGANS)}}  # 14 classes


def v2_plans(spacing, patch_size, pools, *, transpose=(0, 1, 2), scheme="CTNormalization", use_mask=False) -> dict:
    """A plans.json nnU-Net 2.8 accepts (new 'architecture' format), in network axis order."""
    backward = [int(i) for i in np.argsort(transpose)]
    data_kwargs = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": "Dataset999_Parity", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing), "original_median_shape_after_transp": [64, 64, 64],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": list(transpose), "transpose_backward": backward,
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": list(patch_size), "median_image_size_in_voxels": [64, 64, 64],
            "spacing": list(spacing), "normalization_schemes": [scheme], "use_mask_for_norm": [use_mask],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": data_kwargs,
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {
                "network_class_name": "STUNet", "_kw_requires_import": [],
                "arch_kwargs": {"n_stages": 6, "strides": [[1, 1, 1], *pools], "kernel_sizes": [[3, 3, 3]] * 6}},
            "batch_dice": True,
        }},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": CT_STATS},
    }


def dataset_json(channel: str = "CT") -> dict:
    return {"channel_names": {"0": channel}, "labels": LABELS, "numTraining": 1, "file_ending": ".nii.gz"}


def tiny_net(pools, size: str = "tiny", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_stunet(size, 1, len(LABELS), pool_op_kernel_sizes=pools)
    net.deep_supervision = False
    return net.eval()


def write_v2_model(folder: Path, net: torch.nn.Module, plans: dict, dataset: dict | None = None,
                   mirror_axes: tuple[int, ...] = (0, 1, 2)) -> Path:
    """``folder/{plans.json, dataset.json, fold_0/checkpoint_final.pth}``; returns the checkpoint."""
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset or dataset_json(), indent=1))
    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    torch.save({"network_weights": net.state_dict(), "trainer_name": "STUNetTrainer_small",
                "inference_allowed_mirroring_axes": tuple(mirror_axes),
                "init_args": {"configuration": "3d_fullres", "fold": 0}}, ckpt)
    return ckpt


def write_v1_model(folder: Path, net: torch.nn.Module, plans_v2: dict) -> Path:
    """The same model as nnU-Net v1 files: ``model_final_checkpoint.model`` (+ ``.model.pkl``)."""
    config = plans_v2["configurations"]["3d_fullres"]
    stats = plans_v2["foreground_intensity_properties_per_channel"]["0"]
    stage = {"patch_size": np.array(config["patch_size"]), "current_spacing": np.array(config["spacing"]),
             "original_spacing": np.array(config["spacing"]),
             "pool_op_kernel_sizes": config["architecture"]["arch_kwargs"]["strides"][1:],
             "conv_kernel_sizes": [[3, 3, 3]] * 6, "batch_size": 2}
    plans = OrderedDict(
        plans_per_stage=OrderedDict({0: stage}), num_stages=1, num_modalities=1,
        normalization_schemes=OrderedDict({0: "CT"}), use_mask_for_norm=OrderedDict({0: False}),
        transpose_forward=plans_v2["transpose_forward"], transpose_backward=plans_v2["transpose_backward"],
        all_classes=list(range(1, len(LABELS))), num_classes=len(LABELS) - 1,
        dataset_properties={"intensityproperties": OrderedDict({0: OrderedDict(
            mean=np.float64(stats["mean"]), sd=np.float64(stats["std"]), median=stats["median"],
            mn=stats["min"], mx=stats["max"], percentile_00_5=np.float64(stats["percentile_00_5"]),
            percentile_99_5=np.float64(stats["percentile_99_5"]))})},
    )
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "model_final_checkpoint.model"
    torch.save({"epoch": 1000, "state_dict": OrderedDict(net.state_dict()),
                "plot_stuff": ([np.float64(0.5)], [], [], [])}, ckpt)
    with open(folder / "model_final_checkpoint.model.pkl", "wb") as handle:
        pickle.dump({"init": ("plans.pkl", 0, str(folder), "", True, 0), "name": "STUNetTrainer_small",
                     "class": "<class 'STUNetTrainer_small'>", "plans": plans}, handle)
    with open(folder / "plans.pkl", "wb") as handle:
        pickle.dump(plans, handle)
    return ckpt


def nnunet_predictor(net: torch.nn.Module, plans: dict, dataset: dict, mirror: bool = True,
                     mirror_axes: tuple[int, ...] = (0, 1, 2)):
    """nnU-Net 2.8's own ``nnUNetPredictor`` around ``net`` (CPU, step 0.5, Gaussian)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    manager = PlansManager(plans)
    predictor.manual_initialization(net, manager, manager.get_configuration("3d_fullres"),
                                    [{k: v.clone() for k, v in net.state_dict().items()}], dataset,
                                    "STUNetTrainer_small", tuple(mirror_axes))
    return predictor


def nnunet_preprocess(path: Path, plans: dict, dataset: dict) -> tuple[np.ndarray, dict]:
    """nnU-Net's DefaultPreprocessor on a file read with its SimpleITK reader."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    data, _, properties = DefaultPreprocessor(verbose=False).run_case(
        [str(path)], None, manager, manager.get_configuration("3d_fullres"), dataset)
    return data, properties


def nnunet_predict(predictor, path: Path) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Segmentation in nibabel array order, probabilities (K, nibabel order), and the preprocessed logits."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    data, properties = nnunet_preprocess(path, predictor.plans_manager.plans, predictor.dataset_json)
    logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
    seg, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, properties,
        return_probabilities=True, num_threads_torch=1)
    return seg.transpose(2, 1, 0), probabilities.transpose(0, 3, 2, 1), logits


def synthetic_ct(shape, seed=0, border=0) -> np.ndarray:
    """A body (soft tissue + noise) in air with two brighter organs; ``border`` voxels of zeros around it."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    image = np.full(shape, -1000.0)
    body = grid[0] ** 2 + grid[1] ** 2 < 0.8
    image[body] = 40 + rng.normal(0, 20, body.sum())
    image[(grid[0] - 0.3) ** 2 + (grid[1] + 0.2) ** 2 + grid[2] ** 2 < 0.15] += 120
    image[(grid[0] + 0.3) ** 2 + (grid[1] - 0.1) ** 2 + (grid[2] - 0.3) ** 2 < 0.08] += 300
    if border:
        inner = tuple(slice(border, n - border) for n in shape)
        framed = np.zeros(shape)
        framed[inner] = image[inner]
        image = framed
    return image.astype(np.int16)
