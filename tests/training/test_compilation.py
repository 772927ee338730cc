"""--compile auto's rule, the persistent compile cache, one graph for every shape, DDP's overlap kept."""

import json
import os

import pytest
import torch

from rectrain.errors import UserError
from rectrain.training import compilation as comp
from rectrain.training.compilation import (MAX_WARMUP_SHARE, SpatialDynamic, cached_graphs, compile_cache_dir,
                                           decide_compile, estimate_train_s, estimate_warmup, graph_labels,
                                           keep_ddp_overlap, record_graphs, use_compile_cache)

IMAGENET_EPOCH = 1_281_167 // 256  # steps of one ImageNet epoch at batch 256 on one GPU
AREA_224 = 224 * 224


def resnet50_run(epochs: float, cold: int, warm: int = 0):
    """auto's decision for a ResNet-50 run of ``epochs`` ImageNet epochs on a CUDA device."""
    warmup = estimate_warmup(cold, warm, "resnet50")
    train_s = estimate_train_s(int(epochs * IMAGENET_EPOCH), 256, AREA_224, "resnet50", 64)
    return decide_compile("auto", "cuda", warmup, train_s)


def test_auto_is_eager_on_the_cpu_and_says_why_in_one_line():
    d = decide_compile("auto", "cpu")
    assert not d.compile
    assert "\n" not in d.line and "CPU" in d.line and "--compile forces it" in d.line


def test_auto_compiles_a_long_cuda_run_and_says_the_estimate():
    d = resnet50_run(epochs=90, cold=18)  # area mode: 9 training and 9 validation shapes
    assert d.compile
    assert d.warmup.seconds == pytest.approx(18 * comp.COLD_S_PER_GRAPH)
    assert d.warmup.seconds / d.train_s <= MAX_WARMUP_SHARE
    assert "18 graphs to compile" in d.line and "of eager training" in d.line


def test_auto_keeps_a_short_cuda_run_eager_and_says_how_to_force_it():
    d = resnet50_run(epochs=2, cold=18)
    assert not d.compile
    assert "short run" in d.line and "--compile forces it" in d.line


def test_a_warm_cache_lowers_the_estimate_and_can_tip_auto_to_compile():
    cold, warm = resnet50_run(epochs=16, cold=18), resnet50_run(epochs=16, cold=0, warm=18)
    assert warm.warmup.seconds < cold.warmup.seconds
    assert not cold.compile and warm.compile  # 16 epochs (about 73 min): worth compiling from the warm cache only
    assert "18 from the warm cache" in warm.line


def test_the_estimates_scale_with_depth_flops_and_pixels():
    assert estimate_warmup(1, 0, "resnet18").seconds < estimate_warmup(1, 0, "resnet50").seconds
    assert estimate_warmup(1, 0, "resnet50", dynamic=True).seconds > estimate_warmup(1, 0, "resnet50").seconds
    base = estimate_train_s(100, 256, AREA_224, "resnet50", 64)
    assert base == pytest.approx(100 * 256 / comp.REFERENCE_IMAGES_PER_S)
    assert estimate_train_s(100, 256, 2 * AREA_224, "resnet50", 64) == pytest.approx(2 * base)
    assert estimate_train_s(100, 256, AREA_224, "resnet50", 32) == pytest.approx(base / 4)
    # a tiny network's run is short: auto leaves it eager however many epochs
    tiny = estimate_train_s(90 * IMAGENET_EPOCH, 256, 64 * 64, "resnet18", 8)
    assert not decide_compile("auto", "cuda", estimate_warmup(6, 0, "resnet18"), tiny).compile


@pytest.mark.parametrize("setting, device, cuda_graphs, expected", [
    ("on", "cpu", False, True), ("off", "cuda", False, False), ("auto", "cpu", True, True)])
def test_on_off_and_cuda_graphs_decide_without_an_estimate(setting, device, cuda_graphs, expected):
    assert decide_compile(setting, device, cuda_graphs=cuda_graphs).compile is expected


def test_graph_labels_are_one_per_shape_or_one_per_batch_size_when_dynamic():
    train, val = [(8, 64, 96), (8, 96, 64)], [(16, 64, 64)]
    assert graph_labels(train, val, dynamic=False) == ["train 8x64x96", "train 8x96x64", "eval 16x64x64"]
    assert graph_labels(train, val, dynamic=True) == ["train 8xHxW", "eval 16xHxW"]


# -- the persistent cache ------------------------------------------------------------------------------------
def test_a_dynamic_compile_that_specialised_says_per_shape_compiles_faster():
    train, val = [(8, 64, 96), (8, 96, 64), (8, 64, 64)], [(16, 64, 64)]
    assert comp.specialised_note(2, train, val) is None  # one graph per model: as promised
    assert comp.specialised_note(1, train, []) is None
    note = comp.specialised_note(4, train, val)
    assert note.startswith("note: --compile_shapes dynamic built 4 graphs for 4 batch shapes, not 2: torch specialised")
    assert note.endswith("--compile_shapes per_shape compiles them faster")


def test_the_cache_folder_is_the_flag_then_the_users_variable_then_the_users_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    torch_tmp = "/tmp/torchinductor_someone"
    assert compile_cache_dir("~/cc", {}, torch_tmp)[0] == os.path.expanduser("~/cc")
    assert compile_cache_dir(None, {comp.CACHE_ENV: "/data/cc"}, torch_tmp) == ("/data/cc", comp.CACHE_ENV)
    # torch writes its own /tmp default into the variable when torch._dynamo is imported: not the user's choice
    assert compile_cache_dir(None, {comp.CACHE_ENV: torch_tmp}, torch_tmp) == (
        str(tmp_path / "xdg" / "rectrain" / "torch_compile"), "the default")


def test_the_cache_folder_setting_is_what_inductor_uses(tmp_path, monkeypatch):
    """After ``use_compile_cache``, Inductor's own lookups (the FX graph cache, AOTAutograd's, Triton's kernels)
    resolve into the folder, in this process and in the compile workers it starts (they inherit the variable)."""
    monkeypatch.delenv(comp.CACHE_ENV, raising=False)  # restored afterwards
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    folder = tmp_path / "moved cache"
    use_compile_cache(str(folder))
    from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir
    assert os.environ[comp.CACHE_ENV] == str(folder) and cache_dir() == str(folder) and folder.is_dir()
    assert triton_cache_dir(0).startswith(str(folder))
    from torch._inductor import config as inductor_config
    from torch._inductor.codecache import FxGraphCache
    assert inductor_config.fx_graph_cache and FxGraphCache._get_tmp_dir().startswith(str(folder))


def test_an_unwritable_cache_folder_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(comp.CACHE_ENV, raising=False)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="--compile_cache"):
        use_compile_cache(str(tmp_path / "a_file"))


def test_the_record_of_compiled_graphs_accumulates_per_signature(tmp_path):
    record_graphs(str(tmp_path), "arch=resnet50", ["train 8x64x64"])
    record_graphs(str(tmp_path), "arch=resnet50", ["eval 8x64x64", "train 8x64x64"])
    record_graphs(str(tmp_path), "arch=resnet18", ["train 8x32x32"])
    assert cached_graphs(str(tmp_path), "arch=resnet50") == {"train 8x64x64", "eval 8x64x64"}
    assert cached_graphs(str(tmp_path), "arch=resnet101") == set()
    (tmp_path / comp.MARKER).write_text("{not json")  # a broken record: every graph counts as cold
    assert cached_graphs(str(tmp_path), "arch=resnet50") == set()
    record_graphs(str(tmp_path), "arch=resnet50", ["train 8x64x64"])  # and is replaced
    assert json.loads((tmp_path / comp.MARKER).read_text()) == {"arch=resnet50": ["train 8x64x64"]}


# -- DDP and dynamic shapes ----------------------------------------------------------------------------------
class DynamoConfig:
    def __init__(self, optimize_ddp):
        self.optimize_ddp = optimize_ddp


@pytest.mark.parametrize("off", [False, "no_optimization"])
def test_ddp_overlap_is_switched_back_on_when_something_turned_it_off(off):
    config = DynamoConfig(off)
    note = keep_ddp_overlap(config)
    assert config.optimize_ddp is True and "DDPOptimizer" in note


def test_ddp_overlap_left_as_torch_has_it_is_not_touched():
    config = DynamoConfig("ddp_optimizer")
    assert keep_ddp_overlap(config) is None and config.optimize_ddp == "ddp_optimizer"
    from torch import _dynamo
    assert _dynamo.config.optimize_ddp not in (False, "no_optimization")  # the default path wrap_models keeps


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's, raised while torch.compile imports
def test_dynamic_compile_builds_one_graph_for_every_bucket_shape(monkeypatch):
    """--compile_shapes dynamic: the warm-up over two bucket shapes (forward and backward) builds one graph, and a
    third shape needs none (``aot_eager``: Inductor on this CPU would take minutes). Sides of 64 px or more: at 32 px
    ResNet's last feature map is 1x1, a size the graph must specialise (BatchNorm checks it)."""
    import torch._dynamo
    from rectrain.config import TrainConfig
    from rectrain.model import build_model
    from rectrain.runtime.distributed import DistInfo
    from rectrain.trainer import wrap_models
    from rectrain.training.parts import autocast_factory, unwrap
    from rectrain.training.warmup import compiled_graphs, warm_up
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, **{**kw, "backend": "aot_eager"}))
    torch._dynamo.reset()
    model = build_model("resnet18", num_classes=3, width=8)
    models = wrap_models(model, TrainConfig(compile="on", compile_shapes="dynamic"), DistInfo(device="cpu"), 5,
                         compiled=True)
    assert isinstance(models.train, SpatialDynamic) and unwrap(models.train) is model
    before = compiled_graphs()
    warm_up(models.train, models.eval, [(4, 64, 96), (4, 96, 64)], [],
            autocast=autocast_factory("cpu", None), channels_last=False, device=torch.device("cpu"),
            log=lambda s: None)
    assert compiled_graphs() - before == 1
    out = models.train(torch.zeros(4, 3, 128, 64))  # a shape it never saw: no new graph
    assert out.shape == (4, 3) and compiled_graphs() - before == 1
