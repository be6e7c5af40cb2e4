"""STU-Net: published parameter counts and FLOPs, the official key layout, shapes, and checkpoint loading."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from aeval.errors import CaseError
from aeval.models import STUNet, build_stunet, load_pretrained
from aeval.models.stunet import forward_cost, summarize

# Published by the STU-Net authors (1 input channel, 105 TotalSegmentator classes).
PUBLISHED_PARAMS = {"s": 14_596_941, "b": 58_262_669, "l": 440_302_605, "h": 1_457_326_221}
PUBLISHED_TERA_MACS_128 = {"s": 0.13, "b": 0.51, "l": 3.81, "h": 12.60}
WIDTHS = {"s": 16, "b": 32, "l": 64, "h": 96}
BLOCKS = {"s": 1, "b": 1, "l": 2, "h": 3}
ANISO = [[2, 2, 2]] * 4 + [[1, 1, 2]]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("size", ["s", "b"])
def test_parameter_count_built_for_real(size):
    model = build_stunet(size, 1, 105)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[size]


@pytest.mark.parametrize("size", ["l", "h"])
def test_parameter_count_on_meta(size):
    with torch.device("meta"):
        model = build_stunet(size, 1, 105)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[size]


def official_shapes(size: str, in_ch: int, classes: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape, written from the rules of the official STUNet.py (not from our module tree)."""
    dims = [WIDTHS[size] * m for m in (1, 2, 4, 8, 16, 16)]
    depth = BLOCKS[size]
    shapes: dict[str, tuple[int, ...]] = {}

    def block(prefix: str, cin: int, cout: int, shortcut: bool) -> None:
        shapes.update({f"{prefix}.conv1.weight": (cout, cin, 3, 3, 3), f"{prefix}.conv1.bias": (cout,),
                       f"{prefix}.norm1.weight": (cout,), f"{prefix}.norm1.bias": (cout,),
                       f"{prefix}.conv2.weight": (cout, cout, 3, 3, 3), f"{prefix}.conv2.bias": (cout,),
                       f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,)})
        if shortcut:
            shapes.update({f"{prefix}.conv3.weight": (cout, cin, 1, 1, 1), f"{prefix}.conv3.bias": (cout,)})

    for stage in range(6):
        for b in range(depth):
            cin = (in_ch if stage == 0 else dims[stage - 1]) if b == 0 else dims[stage]
            block(f"conv_blocks_context.{stage}.{b}", cin, dims[stage], shortcut=b == 0)
    for u in range(5):
        out = dims[4 - u]
        shapes[f"upsample_layers.{u}.conv.weight"] = (out, dims[5 - u], 1, 1, 1)
        shapes[f"upsample_layers.{u}.conv.bias"] = (out,)
        for b in range(depth):
            block(f"conv_blocks_localization.{u}.{b}", 2 * out if b == 0 else out, out, shortcut=b == 0)
        shapes[f"seg_outputs.{u}.weight"] = (classes, out, 1, 1, 1)
        shapes[f"seg_outputs.{u}.bias"] = (classes,)
    return shapes


@pytest.mark.parametrize("size", ["s", "l"])
def test_state_dict_matches_official_layout(size):
    with torch.device("meta"):
        model = build_stunet(size, 1, 105)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_shapes(size, 1, 105)
    assert sum(np.prod(s) for s in ours.values()) == PUBLISHED_PARAMS[size]


def test_published_macs_at_128():
    for size, tera in PUBLISHED_TERA_MACS_128.items():
        macs = summarize(size, (128, 128, 128))["flops"] / 2
        assert macs / 1e12 == pytest.approx(tera, abs=0.0075), size  # published to 2 decimals


def test_flop_count_equals_hand_formula():
    """Conv MACs written out by hand for STU-Net S at 64^3: out voxels x C_out x C_in x k^3 per conv."""
    dims = [16, 32, 64, 128, 256, 256]
    vox = [64**3 // 8**d for d in range(6)]
    macs = 0
    for d in range(6):
        cin = 1 if d == 0 else dims[d - 1]
        macs += vox[d] * dims[d] * (cin * 27 + dims[d] * 27 + cin)  # conv1, conv2, conv3 (1x1x1)
    for u in range(5):
        d = 4 - u
        macs += vox[d] * dims[d] * dims[d + 1]  # 1x1x1 conv after nearest upsampling
        macs += vox[d] * dims[d] * (2 * dims[d] * 27 + dims[d] * 27 + 2 * dims[d])
        macs += vox[d] * 105 * dims[d]  # head
    assert summarize("s", (64, 64, 64))["flops"] == 2 * macs


def test_activation_estimate_by_hand():
    """Two-stage net, 4^3 input: tensors autograd keeps, counted by hand (fp32 elements)."""
    with torch.device("meta"):
        model = STUNet(1, 3, dims=[2, 4], depth=[1, 1], pool_op_kernel_sizes=[[2, 2, 2]])
    fine, coarse = 64, 8
    stage0 = 1 * fine + 4 * 2 * fine  # input; conv1 out, act1 out, conv2 out, block out
    stage1 = 4 * 4 * coarse  # input is stage0's output (already counted)
    decoder = 4 * fine + 4 * fine + 4 * 2 * fine  # upsampled, concat, 4 block tensors
    expected = 4 * (stage0 + stage1 + decoder)
    got = forward_cost(model, (4, 4, 4))["activation_bytes"]
    assert expected <= got <= expected * 1.05  # plus per-(sample, channel) norm statistics
    assert forward_cost(model, (4, 4, 4), batch=3)["activation_bytes"] == pytest.approx(3 * got)


def test_cost_script(capsys):
    cost = load_script("stunet_cost")
    cost.main(["--size", "s", "--patch", "128", "128", "128"])
    out = capsys.readouterr().out
    assert "14,596,941" in out and "forward MACs      0.129 T" in out
    with pytest.raises(SystemExit):
        cost.main(["--sise", "s"])
    with pytest.raises(SystemExit):
        cost.main(["--size", "s", "--patch", "100", "100", "100"])
    assert "is not divisible" in capsys.readouterr().err


def expected_shapes(patch, pools):
    shapes = [tuple(patch)]
    for p in pools[:-1]:
        shapes.append(tuple(s // k for s, k in zip(shapes[-1], p, strict=True)))
    return shapes


MIXED = [[2, 2, 1], [2, 2, 2], [1, 2, 2], [2, 2, 2], [2, 1, 2]]


@pytest.mark.parametrize("patch, pools", [((64, 64, 64), None), ((16, 16, 64), ANISO), ((16, 32, 32), MIXED)])
def test_output_shapes(patch, pools):
    model = build_stunet("tiny", 1, 14, pool_op_kernel_sizes=pools).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 1, *patch))
    assert isinstance(outs, list) and len(outs) == 5
    assert [tuple(o.shape[2:]) for o in outs] == expected_shapes(patch, pools or [[2, 2, 2]] * 5)
    assert all(o.shape[:2] == (1, 14) for o in outs)


def test_input_not_divisible_is_refused():
    model = build_stunet("tiny", 1, 4, pool_op_kernel_sizes=ANISO)
    assert model.shape_divisor == (16, 16, 32)
    with pytest.raises(ValueError, match=r"not divisible by \(16, 16, 32\)"):
        model(torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="1-voxel bottleneck"):
        model(torch.randn(1, 1, 16, 16, 32))


def test_deep_supervision_toggle():
    model = build_stunet("tiny", 1, 3, deep_supervision=False).eval()
    x = torch.randn(1, 1, 32, 32, 64)
    with torch.no_grad():
        single = model(x)
        model.deep_supervision = True
        outs = model(x)
    assert isinstance(single, torch.Tensor) and single.shape == (1, 3, 32, 32, 64)
    torch.testing.assert_close(outs[0], single)


@pytest.mark.parametrize("model_args", [dict(size="tiny"), dict(dims=[2, 3, 4, 4, 5, 5], depth=[2] * 6)])
def test_every_parameter_gets_a_gradient(model_args):
    if "size" in model_args:
        model = build_stunet(model_args["size"], 2, 3)
    else:
        model = STUNet(2, 3, model_args["dims"], model_args["depth"], MIXED)
    x = torch.randn(1, 2, *((32, 32, 64) if "size" in model_args else (16, 32, 32)))
    loss = sum(o.square().mean() for o in model(x))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


# --- checkpoint loading ----------------------------------------------------------------------------

SMALL_INPUT_POOLS = [[2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 1, 2], [1, 1, 1]]  # 8x16x16 input, 2x2x1 bottleneck


def tiny(in_channels=1, num_classes=4):
    return build_stunet("tiny", in_channels, num_classes, SMALL_INPUT_POOLS, deep_supervision=False).eval()


def outputs(model, x):
    with torch.no_grad():
        return model(x)


class Opaque:
    """Stands for an arbitrary object a weights-only loader must not unpickle."""


def test_nnunet_v1_model_round_trip(tmp_path):
    src = tiny()
    path = tmp_path / "model_final_checkpoint.model"
    torch.save({"epoch": 1000, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()},
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.01}]},
                "amp_grad_scaler": {"scale": 65536.0},
                "plot_stuff": ([np.float64(0.9)], [np.float32(0.8)], [], [np.float64(0.5)]),
                "best_stuff": (np.int64(3), np.float64(0.1), np.array([0.7, 0.8]), np.float64(0.9))}, path)
    dst = tiny()
    report = load_pretrained(dst, path)
    assert report.source.startswith("an nnU-Net v1") and not report.skipped and not report.tiled
    assert sorted(report.loaded) == sorted(src.state_dict())
    x = torch.randn(1, 1, 8, 16, 16)
    torch.testing.assert_close(outputs(dst, x), outputs(src, x), rtol=0, atol=0)


def test_nnunet_v2_pth_round_trip(tmp_path):
    src = tiny()
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()},
                "optimizer_state": {}, "grad_scaler_state": None, "current_epoch": 4000,
                "logging": {"ema_fg_dice": [np.float64(0.5)], "mean_fg_dice": np.array([0.4, 0.6])},
                "_best_ema": np.float64(0.6), "init_args": {"plans": {"name": "p"}, "fold": 0},
                "trainer_name": "STUNetTrainer_large", "inference_allowed_mirroring_axes": (0, 1, 2)}, path)
    dst = tiny()
    report = load_pretrained(dst, path)
    assert report.source.startswith("an nnU-Net v2") and len(report.loaded) == len(src.state_dict())
    x = torch.randn(1, 1, 8, 16, 16)
    torch.testing.assert_close(outputs(dst, x), outputs(src, x), rtol=0, atol=0)


def test_plain_state_dict_into_wrapped_model(tmp_path):
    src = tiny()
    path = tmp_path / "weights.pt"
    torch.save(src.state_dict(), path)
    wrapper = torch.nn.Module()
    wrapper.module = tiny()  # as DistributedDataParallel holds it
    report = load_pretrained(wrapper, path)
    assert report.source == "a plain state dict"
    for k, v in src.state_dict().items():
        torch.testing.assert_close(wrapper.module.state_dict()[k], v, rtol=0, atol=0)


def test_head_mismatch_skips_heads(tmp_path, caplog):
    src = tiny(num_classes=105)
    path = tmp_path / "totalseg.pth"
    torch.save({"network_weights": src.state_dict()}, path)
    dst = tiny(num_classes=14)
    fresh_heads = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("seg_outputs")}
    with caplog.at_level(logging.WARNING, logger="aeval.models.pretrained"):
        report = load_pretrained(dst, path)
    assert sorted(report.skipped) == sorted(fresh_heads) and len(fresh_heads) == 10
    assert all("file 105, model 14" in reason for reason in report.skipped.values())
    assert "seg_outputs.0.weight" in caplog.text and "class count differs" in caplog.text
    for k, v in dst.state_dict().items():
        expected = fresh_heads[k] if k in fresh_heads else src.state_dict()[k]
        torch.testing.assert_close(v, expected, rtol=0, atol=0)


def test_two_channel_model_tiles_input_convs(tmp_path):
    src = tiny(in_channels=1)
    path = tmp_path / "ct.model"
    torch.save({"state_dict": src.state_dict()}, path)
    dst = tiny(in_channels=2)
    report = load_pretrained(dst, path)
    assert report.tiled == {f"conv_blocks_context.0.0.{conv}.weight": 2 for conv in ("conv1", "conv3")}
    w = dst.state_dict()["conv_blocks_context.0.0.conv1.weight"]
    ref = src.state_dict()["conv_blocks_context.0.0.conv1.weight"]
    torch.testing.assert_close(w[:, 0:1] * 2, ref)
    torch.testing.assert_close(w[:, 1:2] * 2, ref)
    x = torch.randn(1, 1, 8, 16, 16, dtype=torch.float64)  # same image in both channels: pretrained output
    got, ref = outputs(dst.double(), torch.cat([x, x], 1)), outputs(src.double(), x)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_shape_mismatch_is_refused_with_a_listing(tmp_path):
    path = tmp_path / "other.pth"
    other = STUNet(1, 4, dims=[4, 8, 16, 32, 64, 32], depth=[1] * 6, pool_op_kernel_sizes=SMALL_INPUT_POOLS)
    torch.save({"network_weights": other.state_dict()}, path)
    dst = tiny()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CaseError) as err:
        load_pretrained(dst, path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: incompatible with the model") and "\n" not in msg
    assert "conv_blocks_context.5.0.conv1.weight: file [32, 64, 3, 3, 3] vs model [64, 64, 3, 3, 3]" in msg
    assert "upsample_layers.0.conv.weight: file [64, 32, 1, 1, 1] vs model [64, 64, 1, 1, 1]" in msg
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # nothing half-loaded


def test_missing_blocks_and_odd_channel_ratio_are_refused(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save({"network_weights": tiny(in_channels=2).state_dict()}, path)
    with pytest.raises(CaseError, match=r"conv1.weight: file \[4, 2, 3, 3, 3\] vs model \[4, 3, 3, 3, 3\]"):
        load_pretrained(tiny(in_channels=3), path)
    deeper = STUNet(2, 4, dims=[4, 8, 16, 32, 64, 64], depth=[2] * 6, pool_op_kernel_sizes=SMALL_INPUT_POOLS)
    with pytest.raises(CaseError, match=r"missing conv_blocks_context\.0\.1\.conv1\.weight"):
        load_pretrained(deeper, path)


def test_unsafe_pickle_needs_trust(tmp_path):
    src = tiny()
    path = tmp_path / "odd.model"
    torch.save({"state_dict": src.state_dict(), "extra": Opaque()}, path)
    with pytest.raises(CaseError, match=r"refusing to unpickle: .*test_stunet\.Opaque.*trusted=True"):
        load_pretrained(tiny(), path)
    report = load_pretrained(tiny(), path, trusted=True)
    assert len(report.loaded) == len(src.state_dict())


def test_unreadable_files(tmp_path):
    with pytest.raises(CaseError, match="checkpoint not found"):
        load_pretrained(tiny(), tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CaseError, match=r"junk\.pth: unreadable checkpoint"):
        load_pretrained(tiny(), junk)
    empty = tmp_path / "nothing.pth"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(CaseError, match="no weights found"):
        load_pretrained(tiny(), empty)


# --- benchmark scripts -----------------------------------------------------------------------------

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_cpu_smoke(capsys):
    gpu = load_script("gpu_stunet")
    assert gpu.pools_for_patch([128] * 3) == [[2, 2, 2]] * 5
    assert gpu.pools_for_patch([32, 64, 64]) == [[2, 2, 2]] * 4 + [[1, 2, 2]]
    rows = gpu.main(["--device", "cpu", "--size", "tiny", "--patch", "32", "--iters", "1", "--warmup", "0",
                     "--num-classes", "4"])
    assert [r["size"] for r in rows] == ["tiny"] and rows[0]["it_per_s"] > 0
    params = sum(p.numel() for p in build_stunet("tiny", 1, 4).parameters())
    assert rows[0]["params_m"] == pytest.approx(params / 1e6)
    assert "| TINY | " in capsys.readouterr().out


@pytest.mark.slow
def test_cpu_speed_measure():
    speed = load_script("stunet_speed")
    row = speed.measure("tiny", patch=64, batch=1, iters=1, warmup=0, num_classes=3)
    assert row["params"] == sum(p.numel() for p in build_stunet("tiny", 1, 3).parameters())
    assert row["s_per_step"] > 0 and row["peak_rss_mib"] > 0
    assert row["estimate_mib"] == pytest.approx(
        forward_cost(build_stunet("tiny", 1, 3), (64, 64, 64), 1)["activation_bytes"] / 2**20)


def test_nnunet_weights_for_fine_tuning_warn_that_axes_are_not_converted(tmp_path, caplog):
    net = build_stunet("tiny", 1, 14)
    torch.save({"network_weights": net.state_dict()}, tmp_path / "checkpoint_final.pth")
    with caplog.at_level(logging.WARNING, logger="aeval.models.pretrained"):
        load_pretrained(build_stunet("tiny", 1, 14), tmp_path / "checkpoint_final.pth")
    assert "not converted" in caplog.text and "nnU-Net's axis order" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aeval.models.pretrained"):
        load_pretrained(build_stunet("tiny", 1, 14), tmp_path / "checkpoint_final.pth", for_training=False)
    assert "not converted" not in caplog.text


def test_size_names_are_the_configs():
    """``aeval.keys.MODEL_SIZES`` (what configs are checked against, without importing torch) lists every size."""
    from aeval.keys import MODEL_SIZES
    from aeval.models.stunet import STUNET_SIZES

    assert tuple(STUNET_SIZES) == MODEL_SIZES
