"""Opening every shared slide, reporting its geometry and resolution, and refusing bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histopilot.errors import (
    CorruptSlideError,
    HistopilotError,
    MissingMPPError,
    NotBrightfieldError,
    RegionError,
    SlideNotFoundError,
    UnsupportedSlideFormatError,
)
from histopilot.slide import open_slide
from tests.conftest import DAB, HEMATOXYLIN

# name: (reader, format, (width, height), level count, mpp or None, objective, modality)
SHARED_SLIDES = {
    "CMU-1-Small-Region.svs": ("openslide", "aperio", (2220, 2967), 1, 0.499, 20, "brightfield"),
    "tcga-cr-7395-01a-01-ts1.svs": (
        "openslide",
        "aperio",
        (4443, 3567),
        2,
        None,
        None,
        "brightfield",
    ),
    "hamamatsu-test3-DAPI-2-387.ndpi": (
        "openslide",
        "hamamatsu",
        (3968, 4864),
        7,
        0.228175,
        40,
        "fluorescence",
    ),
    "dicom-wsi-TCGA-XK-AAJU-01A-01-TS1-level.dcm": (
        "dicom",
        "dicom",
        (3236, 2638),
        1,
        None,
        None,
        "brightfield",
    ),
    "idr0073-kidney-48-5-ihc-thumbnail.tif": (
        "tifffile",
        "tiff",
        (1493, 901),
        1,
        None,
        None,
        "brightfield",
    ),
    "vectra-polaris-3ch-small.qptiff": (
        "tifffile",
        "qptiff",
        (1920, 1440),
        1,
        0.496535,
        10,
        "fluorescence",
    ),
}


@pytest.mark.parametrize("name", sorted(SHARED_SLIDES))
def test_every_shared_slide_reports_geometry_and_resolution(wsi_dir: Path, name: str) -> None:
    reader, fmt, size, levels, mpp, power, modality = SHARED_SLIDES[name]
    with open_slide(wsi_dir / name) as slide:
        info = slide.info
    assert (info.reader, info.format) == (reader, fmt)
    assert (info.width, info.height) == size
    assert len(info.levels) == levels
    assert info.levels[0].downsample == 1.0
    assert info.objective_power == power
    assert info.modality == modality
    if mpp is None:
        assert info.mpp is None
        assert "--slide-mpp" in info.mpp_note
    else:
        assert info.mpp is not None and info.mpp.source == "metadata"
        assert info.mpp.x == pytest.approx(mpp, rel=1e-4)
        assert info.levels[-1].mpp == pytest.approx(mpp * info.levels[-1].downsample, rel=1e-4)


def test_pyramid_levels_shrink_in_step(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "hamamatsu-test3-DAPI-2-387.ndpi") as slide:
        widths = [level.width for level in slide.info.levels]
    assert widths == [3968 // 2**i for i in range(7)]


def test_qptiff_reports_its_channels_and_refuses_brightfield_analysis(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "vectra-polaris-3ch-small.qptiff") as slide:
        assert slide.info.channels == ["DAPI", "FITC", "Cy3"]
        assert slide.read_region(0, 0, 0, 64, 64).shape == (64, 64, 3)  # false-colour view
        with pytest.raises(NotBrightfieldError, match="DAPI, FITC, Cy3"):
            slide.require_brightfield("tissue detection")


def test_dicom_with_column_ordered_frames_is_reassembled(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "dicom-wsi-TCGA-XK-AAJU-01A-01-TS1-level.dcm") as slide:
        assert slide.info.notes  # the repair is reported, not hidden
        # Across every tile seam the image must be continuous: compare the mean jump across a
        # seam with the mean jump between neighbouring columns inside a tile.
        strip = slide.read_region(0, 1000, 0, 3236, 400).astype(np.float32)
        steps = np.abs(np.diff(strip, axis=1)).mean(axis=(0, 2))
        seams = steps[[499, 999, 1499, 1999, 2499, 2999]]
        assert seams.mean() < 3 * np.median(steps)


def test_user_mpp_overrides_and_is_labelled(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "tcga-cr-7395-01a-01-ts1.svs", mpp=0.5) as slide:
        assert slide.info.mpp is not None
        assert (slide.info.mpp.x, slide.info.mpp.source) == (0.5, "user")
        assert slide.info.mpp_note is None


def test_missing_mpp_is_an_error_only_where_physical_units_are_needed(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "tcga-cr-7395-01a-01-ts1.svs") as slide:
        slide.read_region(0, 0, 1, 32, 32)  # pixel units work
        with pytest.raises(MissingMPPError, match="--slide-mpp"):
            slide.read_region_at_mpp(0, 0, 32, 32, mpp=1.0)


def test_label_image_is_withheld_unless_asked_for(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:
        assert "label" in slide.info.associated_images
        with pytest.raises(RegionError, match="patient identifiers"):
            slide.associated_image("label")
        label = slide.associated_image("label", allow_protected=True)
        assert label.shape == (463, 387, 3)
        assert slide.associated_image("thumbnail").shape == (768, 574, 3)


def test_read_at_target_mpp_uses_the_pyramid(synthetic_pyramid: Path) -> None:
    with open_slide(synthetic_pyramid) as slide:
        assert slide.mpp is not None and slide.mpp.mean == pytest.approx(0.25)
        # 1.0 µm/px = downsample 4 = level 2 read as is: the hematoxylin block is 64 px wide there.
        region = slide.read_region_at_mpp(0, 0, 128, 128, mpp=1.0)
        assert region.shape == (128, 128, 3)
        assert (region[:64, :64] == HEMATOXYLIN).all()
        assert (region[70:, 70:] == 255).all()
        # 0.75 µm/px sits between levels: read level 1 (0.5) and shrink.
        blended = slide.read_region_at_mpp(0, 0, 100, 100, mpp=0.75)
        assert blended.shape == (100, 100, 3)
        assert tuple(blended[40, 40]) == HEMATOXYLIN


def test_region_partly_outside_the_slide_is_padded_white(synthetic_pyramid: Path) -> None:
    with open_slide(synthetic_pyramid) as slide:
        region = slide.read_region(1000, 700, 0, 64, 64)
    assert (region[:24, :24] == DAB).all()
    assert (region[40:, 40:] == 255).all()


@pytest.mark.parametrize(
    ("x", "y", "width", "height", "message"),
    [
        (5000, 0, 64, 64, "outside the slide"),
        (0, 0, 0, 64, "must be positive"),
        (0, 0, 200_000, 200_000, "read limit"),
    ],
)
def test_bad_regions_are_refused(
    synthetic_pyramid: Path, x: int, y: int, width: int, height: int, message: str
) -> None:
    with open_slide(synthetic_pyramid) as slide, pytest.raises(RegionError, match=message):
        slide.read_region(x, y, 0, width, height)


def test_missing_level_is_refused(synthetic_pyramid: Path) -> None:
    with open_slide(synthetic_pyramid) as slide, pytest.raises(RegionError, match="levels 0–2"):
        slide.read_region(0, 0, 7, 8, 8)


# -- hostile files ---------------------------------------------------------------------------
def _truncated(source: Path, target: Path, fraction: float) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda d: d / "missing.svs", SlideNotFoundError),
        (lambda d: d, SlideNotFoundError),  # a folder without DICOM files
        (lambda d: _write(d / "empty.svs", b""), CorruptSlideError),
        (
            lambda d: _write(d / "random.svs", np.random.default_rng(0).bytes(50_000)),
            UnsupportedSlideFormatError,
        ),
        (
            lambda d: _write(d / "notes.txt", b"Final diagnosis: benign.\n" * 50),
            UnsupportedSlideFormatError,
        ),
        (lambda d: _write(d / "slide.xyz", b"\x00\x01 not an image"), UnsupportedSlideFormatError),
        (lambda d: _write(d / "fake.tif", b"II*\x00" + b"\xff" * 64), CorruptSlideError),
        (
            lambda d: _write(d / "fake.dcm", b"\x00" * 128 + b"DICM" + b"\x00" * 32),
            UnsupportedSlideFormatError,
        ),
    ],
    ids=[
        "missing",
        "folder",
        "empty",
        "random-bytes",
        "text",
        "unknown-ext",
        "bad-tiff",
        "bad-dicom",
    ],
)
def test_hostile_inputs_raise_clear_errors(tmp_path: Path, make, error) -> None:
    path = make(tmp_path)
    with pytest.raises(error) as raised, open_slide(path) as slide:
        slide.info  # noqa: B018 - forcing a read
    assert str(path.name) in str(raised.value) or str(path) in str(raised.value)


@pytest.mark.parametrize(
    "name",
    [
        "CMU-1-Small-Region.svs",
        "tcga-cr-7395-01a-01-ts1.svs",
        "idr0073-kidney-48-5-ihc-thumbnail.tif",
        "dicom-wsi-TCGA-XK-AAJU-01A-01-TS1-level.dcm",
    ],
)
def test_truncated_slides_raise_a_histopilot_error(
    wsi_dir: Path, tmp_path: Path, name: str
) -> None:
    path = _truncated(wsi_dir / name, tmp_path / name, 0.6)
    with pytest.raises(HistopilotError, match="truncated|damaged|incomplete|unreadable|decoded"):
        with open_slide(path) as slide:
            slide.overview(max_size=512)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("max_size", [253, 254, 300, 1000, 1024])
def test_overview_maps_the_whole_slide_whatever_its_size(
    synthetic_pyramid: Path, max_size: int
) -> None:
    with open_slide(synthetic_pyramid) as slide:  # DAB block at level-0 x 768..1024, y 512..768
        overview, downsample = slide.overview(max_size=max_size)
    assert abs(overview.shape[1] - max_size) <= 1
    x = round(900 / downsample)
    y = round(700 / downsample)
    assert tuple(overview[y, x]) == DAB
    assert tuple(overview[-1, -1]) == DAB  # the bottom-right corner is the block, not padding


def test_dicom_without_matrix_size_is_corrupt(wsi_dir: Path, tmp_path: Path) -> None:
    import pydicom

    dataset = pydicom.dcmread(wsi_dir / "dicom-wsi-TCGA-XK-AAJU-01A-01-TS1-level.dcm")
    del dataset.TotalPixelMatrixColumns
    path = tmp_path / "broken.dcm"
    dataset.save_as(path)
    with pytest.raises(CorruptSlideError, match="matrix size"):
        open_slide(path)


def test_regions_belong_to_the_caller(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:
        region = slide.read_region(0, 0, 0, 16, 16)
        region[:] = 0  # callers may draw on what they read
        assert slide.read_region(0, 0, 0, 16, 16).any()


def test_image_editor_dpi_is_not_taken_for_a_microscope(tmp_path: Path) -> None:
    import tifffile

    path = tmp_path / "export.tif"
    tifffile.imwrite(
        path, np.full((64, 64, 3), 200, np.uint8), resolution=(72, 72), resolutionunit="INCH"
    )
    with open_slide(path) as slide:
        assert slide.info.mpp is None
    tifffile.imwrite(
        path,
        np.full((64, 64, 3), 200, np.uint8),
        resolution=(40_000, 40_000),
        resolutionunit="CENTIMETER",
    )
    with open_slide(path) as slide:
        assert slide.info.mpp is not None
        assert slide.info.mpp.x == pytest.approx(0.25)


def _ome_tiff(path: Path, pixels: np.ndarray, tiff_data: str, own_uuid: str) -> Path:
    """A two-channel OME-TIFF whose ``TiffData`` elements say where each channel lives."""
    import tifffile

    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
        f'UUID="urn:uuid:{own_uuid}"><Image ID="Image:0"><Pixels ID="Pixels:0" '
        'DimensionOrder="XYCZT" Type="uint8" SizeX="64" SizeY="64" SizeC="2" SizeZ="1" '
        'SizeT="1"><Channel ID="Channel:0:0" SamplesPerPixel="1"/>'
        f'<Channel ID="Channel:0:1" SamplesPerPixel="1"/>{tiff_data}</Pixels></Image></OME>'
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, pixels, description=xml, metadata=None)
    return path


def test_an_ome_tiff_never_reads_the_files_its_metadata_names(tmp_path: Path) -> None:
    """An uploaded OME-TIFF that points its second channel at a file elsewhere on the server
    must not show that file's pixels: what it shows cannot depend on that file."""
    secret_uuid = "0f6d8b52-0000-4000-8000-000000000001"
    elsewhere = (
        '<TiffData FirstC="0" IFD="0" PlaneCount="1"/><TiffData FirstC="1" IFD="0" '
        f'PlaneCount="1"><UUID FileName="../private/secret.ome.tif">urn:uuid:{secret_uuid}'
        "</UUID></TiffData>"
    )
    upload = _ome_tiff(
        tmp_path / "uploads" / "evil.ome.tif",
        np.full((64, 64), 40, np.uint8),
        elsewhere,
        "0f6d8b52-0000-4000-8000-000000000002",
    )
    seen = []
    for secret_value in (0, 250):
        _ome_tiff(
            tmp_path / "private" / "secret.ome.tif",
            np.full((2, 64, 64), secret_value, np.uint8),
            '<TiffData FirstC="0" IFD="0" PlaneCount="1"/>'
            '<TiffData FirstC="1" IFD="1" PlaneCount="1"/>',
            secret_uuid,
        )
        with open_slide(upload) as slide:
            seen.append(slide.read_region(0, 0, 0, 64, 64))
    assert np.array_equal(seen[0], seen[1])
