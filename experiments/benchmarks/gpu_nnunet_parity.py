"""GPU, TRAINED weights: aeval's predictor (bf16) vs nnU-Net 2.8's nnUNetPredictor (its GPU defaults:
``perform_everything_on_device``, autocast) on the same nnU-Net v2 model folder, end to end (read ->
preprocess -> sliding window with 8-flip TTA -> restore -> write), in one process. Prints both times, the
ratio and the voxel agreement of the written label maps (issue 14: >= 2x, >= 99.9 %).

Random weights have tiny logit margins (labels flip on rounding), so a STU-Net is first trained for a minute
on synthetic CTs (aeval.data.synthetic phantoms, FLARE22's 14 classes) preprocessed exactly as nnU-Net would
(aeval.data.nnunet_preprocess), then saved as ``plans.json`` + ``dataset.json`` + ``fold_0/checkpoint_final.pth``.

    PYTHONPATH=. python experiments/benchmarks/gpu_nnunet_parity.py                  # GPU, about 3-4 minutes
        (data ~1 min on one core, training 60 s, two predictions per side)
    PYTHONPATH=. python experiments/benchmarks/gpu_nnunet_parity.py --dry-run        # CPU smoke, tiny, < 1 min

Needs torch, monai, nibabel, scipy and (for the reference side) nnunetv2 with its dependencies; without
nnunetv2 the aeval side still runs and the reference is reported as skipped.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from nnunet_reference import dataset_json, v2_plans, write_v2_model  # noqa: E402

from aeval.cpu import set_torch_threads  # noqa: E402
from aeval.data.nnunet_preprocess import nnunet_array, preprocess_nnunet  # noqa: E402
from aeval.data.synthetic import PROFILES, render_case, structure_lookup  # noqa: E402
from aeval.models.load import load_model  # noqa: E402
from aeval.models.stunet import build_stunet  # noqa: E402
from aeval.prediction import make_predictor, predict_file  # noqa: E402


def write_cases(folder: Path, count: int, size_scale: float, seed: int) -> list[Path]:
    """Synthetic FLARE22-like CTs (image + labels) as NIfTI files."""
    folder.mkdir(parents=True, exist_ok=True)
    lut = structure_lookup("flare22")
    paths = []
    for i in range(count):
        case = render_case(PROFILES["flare22"], np.random.default_rng(seed + i), size_scale=size_scale)
        image = folder / f"case{i:02d}_0000.nii.gz"
        nib.save(nib.Nifti1Image(case.image, case.affine), image)
        nib.save(nib.Nifti1Image(lut[case.structures].astype(np.uint8), case.affine), folder / f"case{i:02d}.nii.gz")
        paths.append(image)
    return paths


def training_arrays(paths: list[Path], plan: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each case preprocessed as nnU-Net would, its labels cropped and resampled (nearest) alike."""
    arrays = []
    for path in paths:
        img = nib.load(path)
        image, props = preprocess_nnunet(img, plan, str(path))
        seg = nib.load(str(path).replace("_0000.nii.gz", ".nii.gz"))
        labels, _, _ = nnunet_array(np.asarray(seg.dataobj), seg)
        labels = labels[tuple(slice(lo, hi) for lo, hi in props["bbox_used_for_cropping"])]
        labels = F.interpolate(torch.from_numpy(labels.astype(np.float32))[None, None],
                               size=list(image.shape[1:]), mode="nearest")[0, 0].long()
        arrays.append((torch.from_numpy(image), labels))
    return arrays


def random_patch(image: torch.Tensor, labels: torch.Tensor, patch: list[int], rng: np.random.Generator):
    pads = [max(p - n, 0) for n, p in zip(image.shape[1:], patch, strict=True)]
    flat = [x for d in reversed(pads) for x in (d // 2, d - d // 2)]
    image, labels = F.pad(image, flat), F.pad(labels, flat)
    starts = [int(rng.integers(0, n - p + 1)) for n, p in zip(image.shape[1:], patch, strict=True)]
    index = tuple(slice(s, s + p) for s, p in zip(starts, patch, strict=True))
    return image[(slice(None), *index)], labels[index]


def train(net: torch.nn.Module, arrays, patch: list[int], steps: int, device: torch.device, budget_s: float) -> str:
    """A minute of Adam on random patches (CE + soft Dice), bf16 autocast on a GPU."""
    net.to(device).train()
    net.deep_supervision = False
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-5)
    rng = np.random.default_rng(0)
    start, loss = time.perf_counter(), torch.zeros(())
    done = 0
    while done < steps:
        batch = [random_patch(*arrays[int(rng.integers(len(arrays)))], patch, rng) for _ in range(2)]
        x = torch.stack([b[0] for b in batch]).to(device)
        y = torch.stack([b[1] for b in batch]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(x)
        logits = logits.float()
        probs = logits.softmax(1)
        onehot = F.one_hot(y, logits.shape[1]).movedim(-1, 1).float()
        dice = 1 - ((2 * (probs * onehot).sum((0, 2, 3, 4)) + 1) / (probs.sum((0, 2, 3, 4)) +
                                                                     onehot.sum((0, 2, 3, 4)) + 1)).mean()
        loss = F.cross_entropy(logits, y) + dice
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done += 1
        if time.perf_counter() - start > budget_s:
            break
    net.eval().cpu()
    return f"{done} steps in {time.perf_counter() - start:.0f} s, last loss {float(loss.detach()):.3f}"


def nnunet_side(net, plans: dict, image: Path, out: Path, device: torch.device) -> float | None:
    """nnU-Net's own predictor with its GPU defaults; None without nnunetv2."""
    try:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    except ImportError as err:
        print(f"nnU-Net reference skipped: {err}")
        return None
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                allow_tqdm=False, verbose=False, verbose_preprocessing=False)
    manager = PlansManager(plans)
    predictor.manual_initialization(net, manager, manager.get_configuration("3d_fullres"),
                                    [{k: v.clone() for k, v in net.state_dict().items()}], dataset_json(),
                                    "STUNetTrainer_small", (0, 1, 2))
    predictor.predict_from_files_sequential([[str(image)]], [str(out.with_name(out.name + "_warm"))])
    synchronize(device)
    start = time.perf_counter()
    predictor.predict_from_files_sequential([[str(image)]], [str(out)])
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU smoke: tiny net, small volumes, a few steps")
    parser.add_argument("--device", default=None)
    parser.add_argument("--size", default=None, help="STU-Net size (default s; tiny with --dry-run)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--train-budget-s", type=float, default=60)
    args = parser.parse_args(argv)
    dry = args.dry_run
    device = torch.device(args.device or ("cpu" if dry or not torch.cuda.is_available() else "cuda"))
    size = args.size or ("tiny" if dry else "s")
    patch = [32, 32, 32] if dry else [128, 128, 128]
    spacing = [5.0, 5.0, 5.0] if dry else [1.5, 1.5, 1.5]
    pools = [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2 if dry else [[2, 2, 2]] * 5
    steps = args.steps or (4 if dry else 2000)
    if device.type == "cpu":
        set_torch_threads()  # OMP_NUM_THREADS, else the free cores
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    plans = v2_plans(spacing, patch, pools)
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scale = 1.0 if dry else 3.0  # ~190x190x140 voxels at ~1.8 mm: ~7 s each to render on one core
        cases = write_cases(tmp / "data", 3 if dry else 6, scale, seed=0)
        test = write_cases(tmp / "test", 1, scale, seed=100)[0]
        torch.manual_seed(0)
        net = build_stunet(size, 1, 14, pool_op_kernel_sizes=pools)
        plan = load_model(write_v2_model(tmp / "untrained", net, plans)).plan
        print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch "
              f"{torch.__version__}, STU-Net {size}, patch {patch}, spacing {spacing} mm, test volume "
              f"{nib.load(test).shape}", flush=True)
        print("training:", train(net, training_arrays(cases, plan), patch, steps, device, args.train_budget_s),
              flush=True)
        model = load_model(write_v2_model(tmp / "model", net, plans))
        inference = {"precision": "bf16" if device.type == "cuda" else "fp32", "device": str(device)}
        predictor = make_predictor(model, inference)
        predict_file(predictor, model, test, tmp / "aeval_warm.nii.gz")
        synchronize(device)
        start = time.perf_counter()
        predict_file(predictor, model, test, tmp / "aeval.nii.gz")
        synchronize(device)
        result["aeval_s"] = time.perf_counter() - start
        ours = np.asarray(nib.load(tmp / "aeval.nii.gz").dataobj)
        print(f"aeval ({predictor.precision}, accumulate {predictor.accumulator_for(patch)}): "
              f"{result['aeval_s']:.2f} s end to end; {len(np.unique(ours))} labels present", flush=True)
        result["nnunet_s"] = nnunet_side(net.to(device), plans, test, tmp / "nnunet", device)
        if result["nnunet_s"] is not None:
            reference = np.asarray(nib.load(tmp / "nnunet.nii.gz").dataobj)
            result["agreement"] = float((ours == reference).mean())
            print(f"nnU-Net: {result['nnunet_s']:.2f} s end to end; speed-up nnU-Net/aeval "
                  f"{result['nnunet_s'] / result['aeval_s']:.2f}x; voxel agreement "
                  f"{100 * result['agreement']:.3f} %", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
