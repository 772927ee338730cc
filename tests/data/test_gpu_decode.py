"""GPU decoding (``--decode gpu``): header sniffing, worker items, the batch pipeline and the decode choice.

Without CUDA/torchvision the batch pipeline runs on the CPU with ``pil_decode``, a Pillow stand-in for nvJPEG
(same contract: bytes -> (3, H, W) uint8 as stored). Tolerances: ``resize_crops`` is Pillow's filter, so it
matches ``Image.resize(box=...)`` to 1 grey level (Pillow rounds between passes); against the ``pil`` CPU path the
only other difference is the CPU path's DCT-scaled decode when a crop shrinks 2x or more (mean <= 2 levels).
The ``opencv`` CPU path differs from both by its integer crop bounds and filters (~3 levels mean): boxes and
CPU fallbacks are compared with it exactly, pixels with the ``pil`` path.
"""

import importlib.util
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from rectrain.data import gpu_decode as gd
from rectrain.data.transforms import ALPHA_BACKGROUND, RectangularCropTfm, cv2
from rectrain.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_DECODERS = ["pil"] + (["opencv"] if cv2 is not None else [])


def gradient(w, h):
    """(h, w, 3) uint8 whose every pixel differs: crops and flips show."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x * 3 + y * 5) % 256], -1).astype(np.uint8)


def smooth(w, h):
    """(h, w, 3) uint8 smooth ramps: JPEG-friendly, so decoders and filters agree closely."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 9 + y / 13)], -1).round().astype(np.uint8)


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _without_jfif_with_adobe(data: bytes, transform: int) -> bytes:
    """Replace the APP0 JFIF marker by an APP14 Adobe marker with this colour transform."""
    assert data[2:4] == b"\xff\xe0"
    app0_end = 4 + ((data[4] << 8) | data[5])
    adobe = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([transform])
    return data[:2] + adobe + data[app0_end:]


def _broken_scan(data: bytes) -> bytes:
    """A JPEG whose header is fine but whose scan names a component the frame lacks: no decoder reads it."""
    d = bytearray(data)
    sos = d.find(b"\xff\xda")
    d[sos + 5] = 9
    return bytes(d)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> (path, upright (H, W))."""
    d = tmp_path_factory.mktemp("gpu_decode")
    f = {}

    def put(name, data, size_hw):
        path = str(d / f"{name}.JPEG")
        with open(path, "wb") as fh:
            fh.write(data)
        f[name] = (path, size_hw)

    put("smooth", _jpeg_bytes(Image.fromarray(smooth(160, 120)), quality=95), (120, 160))
    put("portrait", _jpeg_bytes(Image.fromarray(smooth(90, 150)), quality=95), (150, 90))
    put("gradient", _jpeg_bytes(Image.fromarray(gradient(120, 90)), quality=95), (90, 120))
    put("yuv444", _jpeg_bytes(Image.fromarray(smooth(64, 48)), quality=95, subsampling=0), (48, 64))
    put("cmyk", _jpeg_bytes(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), quality=95), (48, 64))
    put("grey", _jpeg_bytes(Image.fromarray(smooth(64, 48)).convert("L"), quality=95), (48, 64))
    put("progressive", _jpeg_bytes(Image.fromarray(smooth(64, 48)), quality=95, progressive=True), (48, 64))
    png = io.BytesIO()
    Image.fromarray(smooth(64, 48)).save(png, "PNG")
    put("png", png.getvalue(), (48, 64))
    for o in (1, 6):  # stored 64 wide, 48 tall; orientation 6 shows it 48 wide, 64 tall
        exif = Image.Exif()
        exif[0x0112] = o
        put(f"exif{o}", _jpeg_bytes(Image.fromarray(gradient(64, 48)), quality=95, exif=exif.tobytes()),
            (64, 48) if o == 6 else (48, 64))
    whole = _jpeg_bytes(Image.fromarray(smooth(64, 48)), quality=95)
    put("truncated", whole[: len(whole) // 2], (48, 64))
    put("adobe_rgb", _without_jfif_with_adobe(whole, 0), (48, 64))
    put("adobe_ycc", _without_jfif_with_adobe(whole, 1), (48, 64))
    put("broken", _broken_scan(whole), (48, 64))
    return f


def _refusal(files, name, size_hw=None):
    path, size = files[name]
    with open(path, "rb") as fh:
        return gd.gpu_refusal(fh.read(), size_hw or size)


def _item(tfm, files, name, out_hw, seed):
    path, size = files[name]
    return tfm(path, out_hw, rng=np.random.default_rng([7, 0, seed]), size_hw=size)


def _cpu_crops(cpu, files, names, out_hw):
    """The CPU path's crops of ``names`` (sample k drawn with seed k): (B, H, W, 3) uint8."""
    return np.stack([_item(cpu, files, n, out_hw, k) for k, n in enumerate(names)])


def _gpu_batch(cpu, files, names, out_hw, decoder=None, **kw):
    """The GPU path (Pillow stand-in decoder) over the same samples: ((B, H, W, 3) uint8, failed, decoder)."""
    tfm = gd.BytesCropTfm(cpu)
    items = [(_item(tfm, files, n, out_hw, k), k, []) for k, n in enumerate(names)]
    batch, _labels, _failed = gd.collate_encoded(items)
    decoder = decoder or gd.GpuBatchDecoder("cpu", decode_fn=gd.pil_decode, cpu_decoder=cpu.decoder, log=lambda m: None,
                                            **kw)
    images, failed = decoder(batch)
    return images, failed, decoder


# -- header sniffing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["smooth", "yuv444", "exif1", "adobe_ycc"])
def test_baseline_ycbcr_jpeg_goes_to_the_gpu(files, name):
    assert _refusal(files, name) is None


@pytest.mark.parametrize("name, reason", [
    ("cmyk", "CMYK/YCCK JPEG"),
    ("grey", "greyscale JPEG"),
    ("progressive", "progressive JPEG"),
    ("png", "not a JPEG"),
    ("exif6", "EXIF rotation"),
    ("truncated", "no end-of-image marker at the end"),
    ("adobe_rgb", "RGB-coded JPEG"),
])
def test_jpeg_the_gpu_cannot_decode_like_the_cpu_is_refused_with_its_reason(files, name, reason):
    assert _refusal(files, name) == reason


def test_jpeg_whose_size_differs_from_the_scan_is_refused(files):
    assert _refusal(files, "smooth", size_hw=(120, 161)) == "size differs from the scan"


def test_read_jpeg_header_reads_the_frame(files):
    with open(files["smooth"][0], "rb") as fh:
        h = gd.read_jpeg_header(fh.read())
    assert (h.sof, h.precision, h.height, h.width, h.jfif) == (0xC0, 8, 120, 160, True)
    assert [(c[1], c[2]) for c in h.components] == [(2, 2), (1, 1), (1, 1)]  # 4:2:0


def test_read_jpeg_header_of_a_non_jpeg_is_none(files):
    with open(files["png"][0], "rb") as fh:
        assert gd.read_jpeg_header(fh.read()) is None


# -- crop + resize + flip on the device -------------------------------------------------------------------
BOXES = [((0, 0, 131, 97), (24, 32)), ((10.3, 5.7, 100.2, 80.9), (40, 50)), ((3.5, 2.25, 20.75, 12.5), (60, 90)),
         ((0, 0, 131, 97), (97, 131)), ((50.5, 40.2, 51.7, 41.9), (5, 7))]


@pytest.mark.parametrize("box, out_hw", BOXES)
def test_resize_crops_matches_pillow_resize_with_the_same_box(box, out_hw):
    a = np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8)  # noise: the worst case
    ref = np.asarray(Image.fromarray(a).resize(out_hw[::-1], Image.Resampling.BILINEAR, box=box), dtype=np.int64)
    got = gd.resize_crops([torch.from_numpy(a).permute(2, 0, 1)], [box], [False], out_hw)[0].numpy()
    assert np.abs(got.astype(np.int64) - ref).max() <= 1


def test_resize_crops_flip_mirrors_the_crop():
    img = torch.from_numpy(gradient(131, 97)).permute(2, 0, 1)
    box = (10.3, 5.7, 100.2, 80.9)
    plain, flipped = gd.resize_crops([img, img], [box, box], [False, True], (40, 50))
    assert torch.equal(flipped, plain.flip(1))


def test_resize_crops_in_several_chunks_equals_one_chunk():
    rng = np.random.default_rng(1)
    imgs = [torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).permute(2, 0, 1)
            for h, w in [(97, 131), (40, 30), (200, 150), (64, 64)]]
    boxes = [(1.5, 2.5, 120.0, 90.0), (0, 0, 30, 40), (20.2, 10.1, 140.9, 190.3), (5, 5, 60, 60)]
    flips = [False, True, True, False]
    one = gd.resize_crops(imgs, boxes, flips, (32, 48))
    many = gd.resize_crops(imgs, boxes, flips, (32, 48), max_pixels=1)  # one image per chunk
    assert torch.equal(one, many)


# -- worker items ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("crop", ["random", "resize"])
def test_worker_box_and_flip_equal_the_cpu_path_for_the_same_rng(files, crop):
    cpu = RectangularCropTfm(train=True, crop=crop)
    tfm = gd.BytesCropTfm(cpu)
    path, size = files["smooth"]
    for seed in range(20):
        item = tfm(path, (32, 48), rng=np.random.default_rng([3, 1, seed]), size_hw=size)
        assert (item.box, item.flip) == cpu.box(size, (32, 48), np.random.default_rng([3, 1, seed]))


def test_worker_leaves_the_rng_where_the_cpu_path_does(files):
    """BucketDataset draws a replacement image from the same rng after a failure: the streams must not drift."""
    cpu = RectangularCropTfm(train=True)
    path, size = files["smooth"]
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    gd.BytesCropTfm(cpu)(path, (32, 48), rng=a, size_hw=size)
    cpu(path, (32, 48), rng=b, size_hw=size)
    assert a.random() == b.random()


def test_worker_hands_gpu_jpegs_on_as_their_file_bytes(files):
    item = _item(gd.BytesCropTfm(RectangularCropTfm(train=True)), files, "smooth", (32, 48), 0)
    with open(files["smooth"][0], "rb") as fh:
        assert item.image is None and item.data.tobytes() == fh.read()


@pytest.mark.parametrize("decoder", CPU_DECODERS)
@pytest.mark.parametrize("name", ["cmyk", "grey", "progressive", "png", "exif6", "adobe_rgb"])
def test_refused_file_is_decoded_in_the_worker_exactly_as_the_cpu_path(files, name, decoder):
    cpu = RectangularCropTfm(train=True, decoder=decoder)
    for seed in range(3):
        item = _item(gd.BytesCropTfm(cpu), files, name, (40, 32), seed)
        assert item.data is None and item.reason == _refusal(files, name)
        assert np.array_equal(item.image, _item(cpu, files, name, (40, 32), seed))


# -- the batch pipeline (Pillow stand-in for nvJPEG) ---------------------------------------------------------
@pytest.mark.parametrize("train", [True, False])
def test_gpu_path_matches_the_pil_cpu_path_within_one_level_without_dct_scaling(files, train):
    """Outputs close to the source size: the CPU path decodes at full scale too, so only rounding differs."""
    cpu = RectangularCropTfm(train=train, scale=(0.6, 1.0), decoder="pil")
    names = ["smooth", "portrait", "gradient"] * 3
    got, _, _ = _gpu_batch(cpu, files, names, (72, 96))
    diff = np.abs(got.numpy().astype(np.int64) - _cpu_crops(cpu, files, names, (72, 96)))
    assert diff.max() <= 1


def test_gpu_path_is_close_to_the_pil_cpu_path_with_dct_scaling(files):
    """Small outputs: the CPU path decodes at 1/2..1/8 DCT scale first; the GPU path filters the full image."""
    cpu = RectangularCropTfm(train=True, decoder="pil")
    names = ["smooth", "portrait"] * 6
    got, _, _ = _gpu_batch(cpu, files, names, (16, 20))
    diff = np.abs(got.numpy().astype(np.int64) - _cpu_crops(cpu, files, names, (16, 20)))
    assert diff.mean() <= 2.0


def test_flipped_samples_are_the_mirror_of_unflipped_ones(files):
    """hflip is drawn after the box: p=1 and p=0 crop the same box, one mirrored."""
    names = ["gradient", "smooth", "portrait"]
    flipped, _, _ = _gpu_batch(RectangularCropTfm(train=True, hflip=1.0), files, names, (40, 48))
    plain, _, _ = _gpu_batch(RectangularCropTfm(train=True, hflip=0.0), files, names, (40, 48))
    assert torch.equal(flipped, plain.flip(2))


def test_batch_is_b_h_w_3_uint8_on_the_device_in_sample_order(files):
    cpu = RectangularCropTfm(train=True, decoder="pil")
    names = ["cmyk", "smooth", "grey", "portrait", "png"]
    got, failed, _ = _gpu_batch(cpu, files, names, (40, 32))
    assert (got.shape, got.dtype, got.device.type, got.is_contiguous(), failed) == (
        (5, 40, 32, 3), torch.uint8, "cpu", True, [])
    for k in (0, 2, 4):  # decoded in the worker: exactly the CPU path's pixels, at their own position
        assert np.array_equal(got[k].numpy(), _item(cpu, files, names[k], (40, 32), k))


def test_cpu_fallbacks_are_counted_and_logged_once(files):
    cpu = RectangularCropTfm(train=True)
    logged = []
    decoder = gd.GpuBatchDecoder("cpu", decode_fn=gd.pil_decode, log=logged.append)
    for _ in range(2):
        _gpu_batch(cpu, files, ["cmyk", "smooth", "grey", "cmyk"], (32, 32), decoder=decoder)
    assert len(logged) == 1 and "cmyk.JPEG: CMYK/YCCK JPEG" in logged[0]
    assert decoder.counts == {"CMYK/YCCK JPEG": 4, "greyscale JPEG": 2} and decoder.gpu_images == 2
    assert decoder.summary() == "decoded 2 images on the GPU, 6 on the CPU (CMYK/YCCK JPEG 4, greyscale JPEG 2)"


def test_batch_the_decoder_rejects_falls_back_per_image(files):
    """nvJPEG fails a whole batch for one image it rejects: the others are still decoded on the GPU, the
    rejected one on the CPU with its box."""
    with open(files["portrait"][0], "rb") as fh:
        rejected = fh.read()

    def picky(datas):
        if any(d.numpy().tobytes() == rejected for d in datas):
            raise RuntimeError("Error while decoding JPEG images")
        return gd.pil_decode(datas)

    cpu = RectangularCropTfm(train=True, decoder="pil")
    names = ["smooth", "portrait", "gradient"]
    decoder = gd.GpuBatchDecoder("cpu", decode_fn=picky, cpu_decoder="pil", log=lambda m: None)
    got, failed, _ = _gpu_batch(cpu, files, names, (40, 48), decoder=decoder)
    assert failed == [] and decoder.gpu_images == 2 and decoder.counts == {"GPU decode failed": 1}
    assert np.array_equal(got[1].numpy(), _item(cpu, files, "portrait", (40, 48), 1))


def test_image_no_decoder_can_read_is_mean_colour_and_reported_failed(files):
    cpu = RectangularCropTfm(train=True, decoder="pil")
    got, failed, _ = _gpu_batch(cpu, files, ["smooth", "broken"], (16, 16))
    assert len(failed) == 1 and files["broken"][0] in failed[0]
    assert (got[1] == torch.tensor(ALPHA_BACKGROUND, dtype=torch.uint8)).all()


def test_batches_cross_worker_processes_and_match_the_cpu_loader(tmp_path):
    """The real DataLoader: workers read bytes, ``collate_encoded`` ships them, ``decoded`` decodes them."""
    from rectrain.data.buckets import make_buckets
    from rectrain.data.loader import BucketDataset, collate
    from rectrain.data.source import scan_split
    from rectrain.data.synth import make_synthetic

    make_synthetic(str(tmp_path), classes=2, train_per_class=4, val_per_class=0, kind="tiny", workers=1)
    scan = scan_split(str(tmp_path), "train", workers=1)
    buckets = make_buckets(32)
    cpu = RectangularCropTfm(train=True, scale=(0.5, 1.0), decoder="pil")
    ds_cpu = BucketDataset(scan, buckets, cpu, seed=3)
    ds_gpu = BucketDataset(scan, buckets, gd.BytesCropTfm(cpu), seed=3)
    keys = [[(i, 2) for i in np.flatnonzero(ds_cpu.bucket_ids == b)] for b in np.unique(ds_cpu.bucket_ids)]
    gpu = torch.utils.data.DataLoader(ds_gpu, batch_sampler=keys, num_workers=1, collate_fn=gd.collate_encoded)
    decoder = gd.GpuBatchDecoder("cpu", decode_fn=gd.pil_decode, cpu_decoder="pil")
    for (images, labels, failed), batch_keys in zip(gd.decoded(gpu, decoder), keys):
        ref, ref_labels, _ = collate([ds_cpu[k] for k in batch_keys])
        assert torch.equal(labels, ref_labels) and failed == []
        assert (images.long() - ref.long()).abs().float().mean() <= 2.0
    assert decoder.gpu_images == len(ds_cpu)


# -- which decoder ------------------------------------------------------------------------------------------
def test_decode_cpu_is_cpu():
    assert gd.resolve_decode("cpu", "cuda") == "cpu"


def test_decode_auto_is_cpu_without_gpu_decoding(monkeypatch):
    monkeypatch.setattr(gd, "gpu_decode_problem", lambda device: "CUDA is not available")
    assert gd.resolve_decode("auto", "cuda") == "cpu"


def test_decode_auto_is_gpu_where_it_is_available(monkeypatch):
    monkeypatch.setattr(gd, "gpu_decode_problem", lambda device: None)
    assert gd.resolve_decode("auto", "cuda") == "gpu"
    assert gd.resolve_decode("auto", "cuda", workers=gd.AUTO_GPU_BELOW_WORKERS - 1) == "gpu"


def test_decode_auto_keeps_the_cpu_workers_when_there_are_enough(monkeypatch):
    monkeypatch.setattr(gd, "gpu_decode_problem", lambda device: None)
    assert gd.resolve_decode("auto", "cuda", workers=gd.AUTO_GPU_BELOW_WORKERS) == "cpu"
    assert gd.resolve_decode("auto", "cuda", workers=16) == "cpu"
    assert gd.resolve_decode("gpu", "cuda", workers=16) == "gpu"  # asked for by name: the user's choice


def test_decode_gpu_on_the_cpu_is_a_user_error_with_the_fix():
    with pytest.raises(UserError, match="Install torchvision with CUDA .* or use --decode cpu"):
        gd.resolve_decode("gpu", "cpu")


def test_unknown_decode_is_a_user_error():
    with pytest.raises(UserError, match="--decode must be one of auto, cpu, gpu"):
        gd.resolve_decode("nvjpeg", "cuda")


def test_gpu_batch_decoder_without_gpu_decoding_is_a_user_error():
    with pytest.raises(UserError, match="--decode cpu"):
        gd.GpuBatchDecoder("cpu")


# -- the real thing, on a CUDA machine with torchvision ------------------------------------------------------
NEEDS_NVJPEG = pytest.mark.skipif(gd.gpu_decode_problem("cuda") is not None, reason="needs CUDA and torchvision")


@NEEDS_NVJPEG
def test_nvjpeg_batch_matches_the_pil_cpu_path(files):
    """nvJPEG's IDCT and chroma upsampling differ a little from libjpeg's: mean <= 3 levels on smooth images."""
    cpu = RectangularCropTfm(train=True, scale=(0.6, 1.0), decoder="pil")
    names = ["smooth", "cmyk", "portrait", "progressive", "gradient"]
    decoder = gd.GpuBatchDecoder("cuda", cpu_decoder="pil", log=lambda m: None)
    tfm = gd.BytesCropTfm(cpu)
    batch, _, _ = gd.collate_encoded([(_item(tfm, files, n, (72, 96), k), k, []) for k, n in enumerate(names)])
    got, failed = decoder(batch.pin_memory())
    torch.cuda.synchronize()
    assert got.device.type == "cuda" and got.shape == (5, 72, 96, 3) and failed == []
    ref = _cpu_crops(cpu, files, names, (72, 96))
    assert np.abs(got.cpu().numpy().astype(np.int64) - ref).mean() <= 3.0
    assert decoder.gpu_images == 3 and decoder.counts == {"CMYK/YCCK JPEG": 1, "progressive JPEG": 1}


@NEEDS_NVJPEG
def test_nvjpeg_batch_with_a_broken_jpeg_keeps_its_good_images(files):
    cpu = RectangularCropTfm(train=True, scale=(0.6, 1.0), decoder="pil")
    names = ["smooth", "broken", "portrait"]
    decoder = gd.GpuBatchDecoder("cuda", cpu_decoder="pil", log=lambda m: None)
    tfm = gd.BytesCropTfm(cpu)
    batch, _, _ = gd.collate_encoded([(_item(tfm, files, n, (72, 96), k), k, []) for k, n in enumerate(names)])
    got = decoder(batch)[0].cpu().numpy().astype(np.int64)
    ref = np.stack([_item(cpu, files, names[k], (72, 96), k) for k in (0, 2)])
    assert np.abs(got[::2] - ref).mean() <= 3.0


# -- the benchmark -------------------------------------------------------------------------------------------
@pytest.mark.skipif(gd.gpu_decode_problem("cuda") is None, reason="this machine can run the benchmark for real")
def test_bench_gpu_decode_skips_cleanly_without_cuda_or_torchvision(capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu_decode",
                                                  os.path.join(ROOT, "benchmarks", "bench_gpu_decode.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main([]) == 0
    assert capsys.readouterr().out.startswith("skipped: no CUDA/torchvision")
